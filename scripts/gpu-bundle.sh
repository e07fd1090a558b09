#!/usr/bin/env bash
# Build the `cuda` feature on a machine WITHOUT a GPU, run it on one WITH a GPU.
#
#   scripts/gpu-bundle.sh build   # here: nvcc on PATH, CUDA libraries on disk
#   scripts/gpu-bundle.sh run     # there: runs target-cuda/bundle/* (no cargo needed)
#
# build needs: nvcc on PATH (e.g. `pip install nvidia-cuda-nvcc==13.0.88
# nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime~=13.0.0
# nvidia-cuda-cccl~=13.0.0 nvidia-curand==10.4.0.35 nvidia-cublas~=13.0.0
# nvidia-cuda-nvrtc~=13.0.0 nvidia-nccl-cu13` in a venv outside the repo);
# match nvcc to the GPU machine's driver: PTX from a newer nvcc does not load on an
# older driver. CUDA_LIBS: directories holding libcublas.so.13, libcublasLt.so.13,
# libnvrtc.so.13, libcurand.so.10, libcudart.so.13 and libnccl.so.2 (a toolkit's
# lib64, or the nvidia/cu13/lib and nvidia/nccl/lib of pip wheels). The bundle is
# built with the `nccl` feature (multi-GPU training's gradient sums). libcuda.so.1 comes with the driver, which a
# GPU-less machine lacks: we link against a stub (empty functions, soname
# libcuda.so.1); the real driver library is loaded on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
bundle=$CARGO_TARGET_DIR/bundle
libs="libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10 libcudart.so.13 libnccl.so.2"
# findlib NAME DIR...: the first DIR/NAME that exists.
findlib() { local so=$1 d; shift; for d; do [ -e "$d/$so" ] && echo "$d/$so" && return; done; return 1; }

build() {
  : "${CUDA_LIBS:?set CUDA_LIBS to the directories holding the CUDA libraries}"
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}  # H100/H200
  # A link folder in CUDA_HOME's layout (CUDA_LINK_DIR, default target-cuda/cudalink;
  # cudarc's build script searches $CUDA_HOME/lib64 and lib64/stubs): unversioned
  # names for -l, versioned ones for the libraries' own dependencies.
  export CUDA_HOME=${CUDA_LINK_DIR:-$CARGO_TARGET_DIR/cudalink}
  link=$CUDA_HOME/lib64
  mkdir -p "$link/stubs"
  for so in $libs; do
    # shellcheck disable=SC2086
    f=$(findlib "$so" $CUDA_LIBS) || { echo "missing $so in CUDA_LIBS" >&2; exit 1; }
    ln -sf "$f" "$link/$so"; ln -sf "$f" "$link/${so%.so.*}.so"
  done
  # The stub exports every driver entry point that cudarc's bindings name.
  sys=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
  grep -o 'load::<_F>("[A-Za-z0-9_]*")' "$sys" | sed 's/.*("\(.*\)")/void \1(void) {}/' |
    sort -u >"$link/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/stubs/libcuda.so" "$link/stubs/libcuda_stub.c"

  cargo build --release --features nccl
  # The test binary's path is printed as JSON; keep the executable.
  test_exe=$(cargo test --release --features nccl --test parity --no-run --message-format=json |
    grep '"kind":\["test"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
  # Stripped, each is ~57 MB (33 MB of it candle's sm_XX kernels): gzip keeps the
  # two under a 64 MiB transfer (~15 MB each).
  mkdir -p "$bundle"
  strip -o "$bundle/pixart" "$CARGO_TARGET_DIR/release/pixart"
  strip -o "$bundle/parity" "$test_exe"
  gzip -f "$bundle/pixart" "$bundle/parity"
  ls -l "$bundle"
}

run() {
  for f in "$bundle"/*.gz; do gunzip -kf "$f"; done
  # Find the CUDA libraries the binaries were linked against: the toolkit, the
  # driver's folder, or PyTorch's pip wheels (nvidia/cu13/lib).
  dirs=$(ls -d /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    2>/dev/null || true)
  for so in $libs; do
    ldconfig -p | grep -q "$so" && continue
    # shellcheck disable=SC2086
    f=$(findlib "$so" $dirs || find /usr /opt -name "$so" 2>/dev/null | head -1) || true
    [ -n "$f" ] && dirs="$dirs $(dirname "$f")"
  done
  LD_LIBRARY_PATH=$(echo $dirs | tr ' ' '\n' | awk '!s[$0]++' | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export LD_LIBRARY_PATH
  echo "== LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ! ldd "$bundle/pixart" "$bundle/parity" | grep 'not found'
  nvidia-smi -L
  echo "== parity tests on cuda"
  PIXART_TEST_DEVICE=cuda PIXART_FIXTURES_DIR=$PWD/tests/fixtures "$bundle/parity" || st=$?
  echo "== bench dit, cuda"
  "$bundle/pixart" bench dit --device cuda --repeat "${REPEAT_CUDA:-20}" || st=$?
  echo "== bench train (forward, loss, backward, clip, AdamW), cuda"
  "$bundle/pixart" bench train --device cuda --repeat "${REPEAT_CUDA:-20}" || st=$?
  echo "== bench train: PixArt-XL/2 at 512 px, batch 2, f32 and bf16 mixed precision, cuda"
  for mp in no bf16; do
    "$bundle/pixart" bench train --device cuda --train-config xl --train-size 512 --batch 2 \
      --mixed-precision "$mp" --repeat "${REPEAT_XL:-10}" || st=$?
  done
  if python3 -c 'import torch, diffusers; assert torch.cuda.is_available()' 2>/dev/null; then
    echo "== the same steps in PyTorch (diffusers; autocast bf16 for mixed precision)"
    for mp in no bf16; do
      python3 scripts/bench_train_torch.py --device cuda --config xl --size 512 --batch 2 \
        --mixed-precision "$mp" --repeat "${REPEAT_XL:-10}" || st=$?
    done
  fi
  echo "== bench dit, cpu"
  RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$(nproc)} "$bundle/pixart" bench dit --device cpu --repeat "${REPEAT_CPU:-5}" || st=$?
  echo "== txt2img on cuda"
  out=${OUT:-out}; mkdir -p "$out"
  "$bundle/pixart" run workflows/txt2img.yaml --device cuda --out "$out" || st=$?
  ls -l "$out"
  return "${st:-0}"
}

case "${1:-}" in
  build | run) "$1" ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
