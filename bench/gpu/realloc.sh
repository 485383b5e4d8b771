#!/bin/bash
# sharding.reallocate on one host's GPUs (2 or 4): the bench's transitions for that device count (2: fsdp2 ->
# tensor2, fsdp2 -> single (1 of 2), single (1 of 2) -> fsdp2, data2 -> fsdp2; 4: the issue's fsdp4 -> tensor4,
# fsdp4 -> tensor2 (2 of 4), tensor2 (2 of 4) -> fsdp4, data2 x tensor2 -> fsdp4) of the stacked 7B and 1B
# trees: the default call (every cell packed, schedule "auto"; its `predicted_s` prices exactly that with the
# card's profile), timed beside the VARIANTS (default "direct,old": direct classes, and the cell-classes
# planner with the serial schedule). An out-of-sample check of realloc_cost: nothing in the run sets a profile.
#
#   OUT=/path/to/out bash bench/gpu/realloc.sh     # from the repo root; ~1.5-2 min on 2 GPUs, at most ~3
#
# Env: DEVICES (default: every GPU nvidia-smi lists), MODELS (default 7b,1b), VARIANTS, REPS (timed calls per
# variant, median; default 3), BUDGET (start no transition after it, s).
# Writes a FRESH $OUT/realloc-<card>x<N>.json (card read from nvidia-smi; no previous_runs), realloc.log,
# table.md (bench/realloc.py --table), fit.txt (bench/realloc.py --fit on this run),
# gpus.txt, and all of them again in extra.tgz.
set -u
: "${OUT:?set OUT to the folder for the results}"
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 60 python3 -c "import jax; print(jax.__version__, jax.devices())"; } > "$OUT/gpus.txt" 2>&1
NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
CARD=$(echo "$NAME" | grep -oiE 'h200|h100|a100|b200' | head -1 | tr 'A-Z' 'a-z')
CARD=${CARD:-gpu}
N=${DEVICES:-$(nvidia-smi -L | wc -l)}
case "$N" in 2|4) ;; *) echo "bench/realloc.py has transitions for 2 or 4 GPUs; this machine has $N (set DEVICES=2 or 4)" >&2; exit 2;; esac
RES="$OUT/realloc-${CARD}x${N}.json"
rm -f "$RES"  # fresh: no previous_runs
timeout $(( ${BUDGET:-110} + 40 )) python3 bench/realloc.py --devices $N --tree stacked --models ${MODELS:-7b,1b} --variants ${VARIANTS:-direct,old} \
  --modes '' --reps ${REPS:-3} --budget ${BUDGET:-110} --out "$RES" > "$OUT/realloc.log" 2>&1
echo "bench exit $?" >> "$OUT/realloc.log"
timeout 15 python3 bench/realloc.py --table "$RES" > "$OUT/table.md" 2>&1
timeout 150 python3 bench/realloc.py --fit "$RES" > "$OUT/fit.txt" 2>&1
(cd "$OUT" && tar czf extra.tgz realloc.log table.md fit.txt gpus.txt)
tail -3 "$OUT/realloc.log"; cat "$OUT/table.md"; grep "within 25%\|^bench" "$OUT/fit.txt"
