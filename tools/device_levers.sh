#!/bin/bash
# Issue 21's levers on a lent accelerator machine (JAX, no TensorFlow) with tools/bench_levers_gpu.py.
# Phase 1: every lever at EP1 epochs x 2 seeds, each arm's epochs scaled to the recipe's CPU time
# (BENCHMARKS.md, "The levers' CPU cost"). Phase 2: the shipped recipe's 66 epochs, baseline and
# the levers that beat it by more than the seed spread, 2 seeds each. Results go to $OUT.
#
# Prepared here (ignored folders, carried to the device):
#   echo /.carry/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
#   python tools/bench_levers_gpu.py pack --data CCP_DATA --out .carry/ccp --size 256x160 --size 320x208
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl keras==3.15.1 namex optree
# Device command (carry .carry and .whl; timeout_s 600):
#   export LOV=0.97 DS=0.85 WIDE=0.50 DEEP=0.55 RES=0.50 EP1=30 JOBS=14 D1=60 P1=340 LIMIT=570; bash tools/device_levers.sh
# Dry run on a CPU: NOWHL=1 KB=tensorflow EP1=1 EP2=1 EXTRA="--limit 16 --policy float32" OUT=/tmp/o ... bash tools/device_levers.sh
T0=$(date +%s)
[ -n "$NOWHL" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 KERAS_BACKEND=${KB:-jax} XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi 2>/dev/null --query-gpu=name,memory.total --format=csv,noheader; nproc; grep -m1 "model name" /proc/cpuinfo
[ -n "$NOWHL" ] || python3 -c "import keras, jax; print('keras', keras.__version__, 'jax', jax.__version__, jax.devices())" 2>&1 | tail -2
EP1=${EP1:-30}
B=tools/bench_levers_gpu.py
R=.carry/results
timeout ${P1:-330} python3 $B run --packed .carry/ccp --out $R/p1 --epochs $EP1 $EXTRA --seeds 1,2 --jobs ${JOBS:-8} --deadline ${D1:-120} \
  --arm 'baseline:infer=320x208' --arm 'ema:ema=0.99' --arm "lovasz:lovasz=0.5;epochs_scale=$LOV" --arm "ds:deep_supervision=0.5;epochs_scale=$DS" \
  --arm "res:size=320x208;epochs_scale=$RES" --arm "wide:base_filters=24;epochs_scale=$WIDE" --arm "deep:depth=6;epochs_scale=$DEEP"
cp $R/p1/levers.md $OUT/p1-levers.md; cp $R/p1/levers.json $OUT/p1-levers.json; grep -v "^WARNING\|^I0000\|^E0000\|^W0000" $R/p1/runs.log | tail -c 200000 > $OUT/p1-runs.log
echo "phase 1 done at $(( $(date +%s) - T0 )) s"; cat $R/p1/levers.md
COMBO=$(python3 - <<'PY'
import json, statistics
rs = json.load(open(".carry/results/p1/levers.json"))
by = {}
for r in rs: by.setdefault(r["arm"], []).append(r)
def m(a): return [r["scores"][r["size"]]["dataset"] for r in by.get(a, [])]
import os
b = m("baseline"); keep = []; extra = 0.0
for arm, key, cost in (("ema", "ema=0.99", 0.0), ("lovasz", "lovasz=0.5", 1 / float(os.environ["LOV"]) - 1),
                       ("ds", "deep_supervision=0.5", 1 / float(os.environ["DS"]) - 1)):
    x = m(arm)
    if len(x) == 2 and len(b) == 2 and statistics.mean(x) - statistics.mean(b) > max(max(x) - min(x), max(b) - min(b)):
        keep.append(key); extra += cost
print(";".join(keep + [f"epochs_scale={1 / (1 + extra):.3f}"]) if keep else "")
PY
)
echo "phase 2 levers: '$COMBO'"
LEFT=$(( ${LIMIT:-570} - ($(date +%s) - T0) - 15 ))
ARMS=(--arm 'baseline66:infer=320x208')
[ -n "$COMBO" ] && ARMS+=(--arm "levers66:$COMBO;infer=320x208")
[ $LEFT -gt 60 ] && timeout $LEFT python3 $B run --packed .carry/ccp --out $R/p2 --epochs ${EP2:-66} $EXTRA --seeds 1,2 --jobs 4 --deadline 30 "${ARMS[@]}"
cp $R/p2/levers.md $OUT/p2-levers.md 2>/dev/null; cp $R/p2/levers.json $OUT/p2-levers.json 2>/dev/null
grep -v "^WARNING\|^I0000\|^E0000\|^W0000" $R/p2/runs.log 2>/dev/null | tail -c 100000 > $OUT/p2-runs.log
echo "all done at $(( $(date +%s) - T0 )) s"; cat $R/p2/levers.md 2>/dev/null
