#!/usr/bin/env bash
# Runs kvmem's GPU tests on a lent GPU machine, which has the CUDA runtime but none of our other
# dependencies. Two halves:
#   here (the development machine):  scripts/gpu-check.sh pack
#       builds with CUDA and packs executables, the libraries the GPU machine lacks and the
#       test models into gpu-pack/ (git-ignored; name it in the device tool's `carry`);
#   there (the GPU machine):           scripts/gpu-check.sh run
#       runs every CUDA test, then the kernel tests again under compute-sanitizer (memcheck,
#       racecheck), writing logs to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  pack)
    scripts/bootstrap.sh -DKVMEM_CUDA=ON
    ../shared/tools/pack-binaries.sh build gpu-pack
    ;;
  run)
    export LD_LIBRARY_PATH="$PWD/gpu-pack/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    out="${OUT:-/tmp}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
    status=0
    for t in kernels_test kernels_attention_test; do
      gpu-pack/bin/$t 2>&1 | tee "$out/$t.log" | tail -3 || status=1
    done
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    if [[ -x $sanitizer ]]; then
      for tool in memcheck racecheck; do
        "$sanitizer" --tool "$tool" --error-exitcode 99 gpu-pack/bin/kernels_attention_test \
          >"$out/sanitizer-$tool.log" 2>&1 || { status=1; tail -20 "$out/sanitizer-$tool.log"; }
      done
    fi
    exit $status
    ;;
  *)
    echo "usage: scripts/gpu-check.sh pack|run" >&2
    exit 2
    ;;
esac
