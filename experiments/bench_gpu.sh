#!/usr/bin/env bash
# repjax vs PyTorch on the GPU machine: bench_models (fp32 and bf16) and the depthwise-conv algorithms.
#
# On the device machine (tool `run`, from the repo root; the image has JAX+CUDA, flax, optax, orbax, chex, timm
# and torch, not ml-collections / grain / tensorboardX: carry them as wheels, see the device README):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl ml-collections grain tensorboardX absl-py
#     run(command="bash experiments/bench_gpu.sh", carry=[".whl"], timeout_s=600)
# Results land in $OUT (device machine) or experiments/results/bench_gpu:
#     models_fp32/results.json, models_bf16/results.json   (experiments/bench_models.py rows, ratios.png)
#     dwconv/results.json                                  (experiments/bench_dwconv.py: ms per algorithm)
# The dwconv table sets the GPU `auto` thresholds in repjax/nn/dwconv/ops.py (ACCEL_NATIVE_MAX_K: the largest K
# where 'native' beats 'fft' fwd+bwd; for piecewise kernels whether 'boxsum' beats both).
#
# CPU dry run of the same path (tiny variants, torch on CPU):  DRY=1 bash experiments/bench_gpu.sh /tmp/gpu_dry
# ONLY="resnet20,repvgg_a0" restricts the model rows (bench_models --only).
set -euo pipefail
OUT_DIR=${1:-${OUT:-experiments/results/bench_gpu}}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${DRY:-0}" = 1 ]; then DEV=cpu; QUICK=(--quick); else DEV=cuda; QUICK=(); fi
ONLY_ARGS=()
if [ -n "${ONLY:-}" ]; then ONLY_ARGS=(--only "$ONLY"); fi
mkdir -p "$OUT_DIR"
$PY -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
for dt in fp32 bf16; do
  $PY experiments/bench_models.py "${QUICK[@]}" "${ONLY_ARGS[@]}" --dtype $dt --torch-device $DEV --rounds 5 --iters 10 \
      --out "$OUT_DIR/models_$dt" 2>&1 | grep -v -e USDT -e "CPUAllocator" | tee "$OUT_DIR/models_$dt.log"
done
$PY experiments/bench_dwconv.py "${QUICK[@]}" --torch-device $DEV --out "$OUT_DIR/dwconv" 2>&1 | tee "$OUT_DIR/dwconv.log"
