#!/bin/bash
# sharding.reallocate on 2 GPUs: the 2-GPU transitions (fsdp2 -> tensor2, fsdp2 -> single (1 of 2),
# single (1 of 2) -> fsdp2, data2 -> fsdp2) of the stacked 7B and 1B trees: the default call (every cell
# packed, schedule "auto"; its `predicted_s` prices exactly that with the card's profile) timed side by side
# with the variants "direct" (direct classes) and "old" (the cell-classes planner, serial schedule).
# An out-of-sample check of realloc_cost: nothing in this run was used to set the profiles.
#
#   OUT=/path/to/out bash bench/gpu/realloc_2gpu.sh     # from the repo root; ~1.5-2 min, at most ~3 (timeouts below)
#
# Writes a FRESH $OUT/realloc-<card>x2.json (card read from nvidia-smi: h200x2 or h100x2; no previous_runs),
# realloc.log, table.md (bench/realloc.py --table), fit.txt (bench/realloc.py --fit on this run and the three
# committed files), gpus.txt, and all of them again in extra.tgz.
set -u
: "${OUT:?set OUT to the folder for the results}"
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 60 python3 -c "import jax; print(jax.__version__, jax.devices())"; } > "$OUT/gpus.txt" 2>&1
NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
CARD=$(echo "$NAME" | grep -oiE 'h200|h100|a100|b200' | head -1 | tr 'A-Z' 'a-z')
CARD=${CARD:-gpu}
RES="$OUT/realloc-${CARD}x2.json"
rm -f "$RES"  # fresh: no previous_runs
timeout 150 python3 bench/realloc.py --devices 2 --tree stacked --models 7b,1b --variants direct,old \
  --modes '' --reps 3 --budget 110 --out "$RES" > "$OUT/realloc.log" 2>&1
echo "bench exit $?" >> "$OUT/realloc.log"
timeout 15 python3 bench/realloc.py --table "$RES" > "$OUT/table.md" 2>&1
timeout 90 python3 bench/realloc.py --fit "$RES" bench/results/realloc-h200x2.json bench/results/realloc-h100x2.json \
  bench/results/realloc-h100.json > "$OUT/fit.txt" 2>&1
(cd "$OUT" && tar czf extra.tgz realloc.log table.md fit.txt gpus.txt)
tail -3 "$OUT/realloc.log"; cat "$OUT/table.md"; grep "within 25%\|^bench" "$OUT/fit.txt"
