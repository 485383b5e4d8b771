#!/bin/bash
# Issue 7 on one host's GPUs (2x H200 on 2026-11-26: bench/results/plans-h200x2.json): calibrate a profile on
# this machine at the planned shapes, then measure the searched plan against the colocated heuristics (and
# the disaggregated one where the Planner has it), predicted vs measured per plan and per call. PPO 1.3B
# actor/ref + 350M critic/reward by default. Run from the repository root:
#   OUT=/path bash bench/gpu/plans.sh          (about 8.5 min wall, <= 9 with the default END_S)
#
# Env overrides: DEVICES (default: every GPU nvidia-smi lists), SETTINGS (bench/plans.py --settings, default
# 1.3b:512), COLOCATED (its --colocated; default d{N}f1t1,d1f1t{N},d1f{N}t1 on 2 GPUs, best on more),
# CALIBRATE=0 (skip step 1), CASES (calibration cases, `python -m search.profile --cases`; default: the
# 1.3B/350M calls of the setting's layouts at generation CAL_GEN, default 512; see step 1), CAL_BUDGET (its --budget,
# default 160 on 2 GPUs, 360 on more), CAL_S (its timeout, default CAL_BUDGET + 55), PROFILE (profile for step 2 when step 1 is skipped or fails;
# default search/profiles/h100_sxm_bench.json), END_S (wall seconds the whole script may use, default 530),
# ITERS (timed iterations per plan, default 2), BATCH (prompts per iteration, bench/plans.py --batch; default
# per models), PY (python, default python3), MEM_FRACTION (JAX's share of each card's memory, default 0.9).
#
# Results under $OUT (CARD = h200 or h100, read from nvidia-smi): plans-${CARD}x${N}.json (bench/plans.py),
# ${CARD}_${N}gpu.json (the calibrated profile with its calibration_report), run.log (both steps' output and
# the GPUs), and, if step 2 ends before its timeout, ${CARD}_${N}gpu_plans_fit.json (per-kind time factors
# refitted to the measured calls: an in-sample diagnosis aid, not a validated profile).
set -u
: "${OUT:?set OUT to the folder for the results}"
SECONDS=0
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -q H200 && echo h200 || echo h100)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# JAX hands out 75% of a card's memory unless told; planned peaks are checked against what it hands out
# (Profile.on_local_devices), so give it the share a long training job would.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.9}
export JAX_COMPILATION_CACHE_DIR=$PWD/.jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
PY=${PY:-python3}
SETTINGS=${SETTINGS:-1.3b:512}
N=${DEVICES:-$(nvidia-smi -L | wc -l)}
case "$N" in 2|4|8) ;; *) [ -n "${CASES:-}" ] || { echo "no default calibration cases for $N GPUs: set CASES (or DEVICES=2, 4 or 8)" >&2; exit 2; };; esac
if [ "$N" = 2 ]; then COLOCATED=${COLOCATED:-d2f1t1,d1f1t2,d1f2t1}; else COLOCATED=${COLOCATED:-best}; fi
G=${CAL_GEN:-512}
S=$((128 + G))
END_S=${END_S:-530}
FALLBACK=${PROFILE:-search/profiles/h100_sxm_bench.json}
CAL=$OUT/${CARD}_${N}gpu.json
LOG=$OUT/run.log
mkdir -p .jax_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $LOG 2>&1

# 1. Calibration (~3.5 min on 2 GPUs; on 4 the 11 default cases need ~6 min, so the plans get what is
# left of END_S: run them in a second call, CALIBRATE=0 PROFILE=$OUT/<card>_4gpu.json): the calls of the
# 1.3b bench setting, generation first (the largest error so far); each case compiles once (the colocated
# generation then hits the persistent cache in step 2). Base h100_sxm_bench: kinds the budget cuts keep its factors.
PROFILE_USED=$FALLBACK
if [ "${CALIBRATE:-1}" = 1 ]; then
  if [ "$N" = 2 ]; then
    DEFAULT_CASES="1.3b generate 0:2/d2f1t1 b128p128n$G; 1.3b generate 0:2/d1f1t2 b128p128n$G;\
 1.3b train 0:2/d1f2t1 b32s$S remat=full; 1.3b logprobs 0:2/d2f1t1 b128s$S; 350m values 0:2/d2f1t1 b128s$S;\
 350m train 0:2/d1f2t1 b32s$S remat=full; 1.3b generate 0:2/d1f2t1 b128p128n$G"
  else  # The 4x H200 run's cases (search/profiles/h200_4gpu.json) for the 1.3b setting, plus one GPU alone:
    # the disaggregated plan's generation (128 rows on one GPU) was predicted 16-24% low without it;
    # plus tensor-parallel inference, the only case whose all-reduces fit inference's `reduce_time`
    # (unfitted, tensor=4 inference was predicted 1.3x slow on 4x H200).
    DEFAULT_CASES="1.3b generate 0:$N/d1f1t$N b128p128n$G; 1.3b generate 0:$N/d${N}f1t1 b128p128n$G;\
 1.3b train 0:$N/d1f${N}t1 b32s$S remat=full; 1.3b logprobs 0:$N/d${N}f1t1 b128s$S; 350m values 0:$N/d1f${N}t1 b128s$S;\
 350m train 0:$N/d1f${N}t1 b32s$S remat=full; 1.3b generate 0:1/d1f1t1 b128p128n$G; 350m train 0:1/d1f1t1 b32s$S remat=full;\
 1.3b train 0:$N/d${N}f1t1 b32s$S remat=full; 1.3b generate 0:$N/d2f1t$((N / 2)) b128p128n$G; 1.3b logprobs 0:$N/d1f1t$N b128s$S"
  fi
  CASES=${CASES:-$DEFAULT_CASES}
  echo "== [$SECONDS s] calibrate" >> $LOG
  if [ "$N" = 2 ]; then CAL_BUDGET=${CAL_BUDGET:-160}; else CAL_BUDGET=${CAL_BUDGET:-360}; fi
  timeout ${CAL_S:-$((CAL_BUDGET + 55))} $PY -m search.profile --calibrate --base h100_sxm_bench --name ${CARD}_${N}gpu --budget $CAL_BUDGET --reps 3 \
    --cases "$CASES" --out $CAL >> $LOG 2>&1
  echo "calibrate exit $? at $SECONDS s" >> $LOG
  # fitted: use it; cut off before its fit (timeout) with timed cases: fit those (numbers only, seconds).
  STATUS=$($PY -c "import json,sys; d=json.load(open(sys.argv[1]))['calibration_report']; \
n=sum(1 for r in d.get('records', []) if r.get('measured_s')); \
print('fitted' if d.get('status') == 'fitted' else 'refit' if n else 'none')" $CAL 2>/dev/null)
  echo "calibration: ${STATUS:-none (no profile written)}" >> $LOG
  if [ "$STATUS" = fitted ]; then
    PROFILE_USED=$CAL
  elif [ "$STATUS" = refit ]; then
    timeout 60 $PY -m search.profile --refit $CAL --out $CAL >> $LOG 2>&1 && PROFILE_USED=$CAL
  fi
fi
echo "== [$SECONDS s] plans with profile $PROFILE_USED" >> $LOG

# 2. Plans: search on N GPUs, then run the searched plan and the heuristics. No plan run starts later than
# ~100 s before END_S (a run: compile ~60 s + the iterations); the JSON is rewritten after every plan run,
# so a cut-off run keeps the others.
LEFT=$((END_S - SECONDS))
BUDGET=$((LEFT - 105))
[ $BUDGET -lt 60 ] && BUDGET=60
# SIGUSR1 first: bench/plans.py prints every thread's stack (where a hung plan run waits), then the kill.
timeout -s USR1 -k 10 $((LEFT - 15)) $PY bench/plans.py --settings $SETTINGS ${BATCH:+--batch $BATCH} --devices $N --colocated $COLOCATED \
  --warmup 1 --iters ${ITERS:-2} --budget $BUDGET --search-s 30 --profile $PROFILE_USED --out $OUT/plans-${CARD}x$N.json \
  --fit-profile $OUT/${CARD}_${N}gpu_plans_fit.json >> $LOG 2>&1
echo "plans exit $? at $SECONDS s" >> $LOG

# What to look at first: calibration summary, each plan run, the final table (bench/plans.py prints it).
grep -E "^(==|planned|  [a-z]|[0-9.a-z]+:[0-9]+: |all_calls|leave_one_out|fitted|calibrat|budget|plans exit|\[)" \
  $LOG | cut -c1-400 | tail -60
ls -la $OUT
