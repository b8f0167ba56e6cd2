#!/bin/bash
# The accelerator run, as one prepared call (about 13 minutes). First (issue 40) what one 8B block's programs cost to
# compile and to run at uniform and mixed ranks (compile_block.py). Then (issue 30) where an 8B block's time goes:
# profile_block.py times statistics, whitening, svd-llm's factorization in float32 and float64 and one SigmaScale
# step, writing its table after every part, then traces each with jax.profiler ($OUT/profile_gpu-trace); and the
# memory plan of the same run (--plan-only) beside the device's measured peak. Then, as issue 16 had it:
# bench_scale.py on one Llama-3.1-8B-shaped block
# (eigh truncation, per stage and the whole SigmaScale factorizer), one Qwen3-8B-shaped block, then the
# svd truncation's step on the Llama block for comparison. Each part has its own time limit and writes
# its own JSON/markdown under $OUT (default results/), so a part that runs out of time loses only itself.
#   OUT=/tmp/x bash scripts/scale_gpu.sh            # SHAPE_A=smoke SHAPE_B=smoke to check the plumbing on a CPU
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-results}
A=${SHAPE_A:-llama-3.1-8b}
B=${SHAPE_B:-qwen3-8b}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
# issue 40 first: one 8B block's statistics and SigmaScale learning, compiled once and run at uniform, then mixed
# ranks (0 compiles expected), and the whole-model estimate against 20 minutes (results/compile_block_gpu.md)
timeout ${TC:-200} $PY scripts/compile_block.py --shape "$A" --out "$OUT/compile_block_gpu" || echo "compile part failed: $?"
timeout ${T0:-240} $PY scripts/profile_block.py --shape "$A" --work /tmp/scale --out "$OUT/profile_gpu" \
    || echo "part 0 failed: $?"
timeout ${TP:-120} $PY -m sigmascale_jax.compress --model /tmp/scale/$A --method sigmascale --ratio 0.2 \
    --steps 50 --step-windows 4 --plan-only --device-memory 80GB > "$OUT/plan_gpu.txt" || echo "plan failed: $?"
SMOL=${SMOLLM2:-../shared/models/smollm2-135m-instruct-q4_1}  # the plan against the device's own peak counter
[ -d "$SMOL" ] && { timeout ${TM:-150} $PY scripts/bench_memory_plan.py --model "$SMOL" --methods svd-llm \
    --out "$OUT/memory_plan_gpu" || echo "memory plan part failed: $?"; }
timeout ${T1:-150} $PY scripts/bench_scale.py --shapes "$A" --truncations eigh --full-block --work /tmp/scale \
    --out "$OUT/scale_gpu_a" || echo "part 1 failed: $?"
timeout ${T2:-40} $PY scripts/bench_scale.py --shapes "$B" --truncations eigh --work /tmp/scale \
    --out "$OUT/scale_gpu_b" || echo "part 2 failed: $?"
timeout ${T3:-40} $PY scripts/bench_scale.py --shapes "$A" --truncations svd --work /tmp/scale \
    --out "$OUT/scale_gpu_a_svd" || echo "part 3 failed: $?"
