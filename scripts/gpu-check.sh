#!/usr/bin/env bash
# GPU check on a machine with an NVIDIA GPU, the CUDA toolkit (nvcc) and cargo:
# build with `--features cuda`, run the parity tests on the GPU, benchmark one
# transformer forward (and a training step) on GPU and CPU, and run the txt2img workflow on the GPU.
#   scripts/gpu-check.sh                    # from anywhere inside the repo
#   CUDA_COMPUTE_CAP=90 scripts/gpu-check.sh  # skip detection (e.g. 80 for A100)
# No GPU on the build machine? See scripts/gpu-bundle.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# candle's kernels are compiled for one compute capability: the GPU's, else sm_90.
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
    head -1 | tr -d ' .' || true)
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# A separate target dir: switching the feature on and off would rebuild the kernels.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
echo "== CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
nvidia-smi -L

cargo build --release --features cuda
echo "== parity tests on cuda"
PIXART_TEST_DEVICE=cuda cargo test --release --features cuda --test parity

pixart="$CARGO_TARGET_DIR/release/pixart"
echo "== bench dit, cuda"
"$pixart" bench dit --device cuda --repeat "${REPEAT_CUDA:-20}"
echo "== bench train, cuda"
"$pixart" bench train --device cuda --repeat "${REPEAT_CUDA:-20}"
echo "== bench dit, cpu"
"$pixart" bench dit --device cpu --repeat "${REPEAT_CPU:-5}"
echo "== txt2img on cuda"
mkdir -p out
"$pixart" run workflows/txt2img.yaml --device cuda --out out
