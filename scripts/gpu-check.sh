#!/usr/bin/env bash
# Runs kvmem's GPU tests on a lent GPU machine, which has the CUDA runtime but none of our other
# dependencies. Two halves:
#   here (the development machine):  scripts/gpu-check.sh pack
#       builds with CUDA and packs the GPU test and bench executables (stripped), the libraries
#       the GPU machine lacks and the test model into gpu-pack.tgz (git-ignored, about 25 MB;
#       name it in the device tool's `carry`);
#   there (the GPU machine):           scripts/gpu-check.sh run
#       runs every CUDA test, then the kernel tests again under compute-sanitizer (memcheck,
#       racecheck), writing logs to $OUT when set;
#   there:                             scripts/gpu-check.sh bench
#       runs bench/cuda_bench (decode roofline, turn append, page-in) into $OUT/cuda_bench.md,
#       then bench/turn_host_bench (the session's host work around a turn, at 8B shape) on
#       that machine's server-class CPU into $OUT/turn_host_bench.md (also with f32 blocks and
#       with blocks inside RocksDB, to compare).
#   there:                             scripts/gpu-check.sh all [SECONDS]
#       everything a session's one device call should do, most important first, inside SECONDS
#       (default 480, so that a 600 s call leaves time to spare): the GPU tests, the 8B and 1B
#       benchmark, then compute-sanitizer on the kernel tests while time is left. Each stage
#       gets what is left of the budget; what did not fit is said in $OUT/summary.txt. Four
#       files come back (the device tool returns at most eight): summary.txt, tests.log,
#       cuda_bench.md and sanitizer.log.
set -euo pipefail
cd "$(dirname "$0")/.."

# On the GPU machine: unpacks gpu-pack.tgz once and points the binaries at its libraries and
# model (service_gpu_test starts kvmemd from gpu-pack/bin); logs go to $OUT when set.
unpack() {
  [[ -d gpu-pack ]] || tar xzf gpu-pack.tgz
  export LD_LIBRARY_PATH="$PWD/gpu-pack/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export KVMEM_TEST_MODEL_DIR="$PWD/gpu-pack/models/stories260K"
  export KVMEM_BIN_DIR="$PWD/gpu-pack/bin"
  out="${OUT:-/tmp}"
}

case "${1:-}" in
  pack)
    scripts/bootstrap.sh -DKVMEM_CUDA=ON
    # Only what the GPU runs, stripped, with the libraries a bare CUDA machine lacks and the
    # test model, then compressed: the device tool carries at most 64 MiB, and OpenBLAS alone
    # is 35 MB uncompressed.
    rm -rf gpu-pack gpu-pack.tgz
    mkdir -p gpu-pack/bin gpu-pack/lib gpu-pack/models
    for b in kernels_test kernels_attention_test cuda_backend_test service_gpu_test kvmemd \
      cuda_bench turn_host_bench; do
      cp "build/bin/$b" gpu-pack/bin/ && strip -s "gpu-pack/bin/$b"
    done
    skip='/libc\.so|/libm\.so|ld-linux|libgcc_s|libstdc\+\+|libpthread|libdl\.|librt\.|libcuda\.|libcudart|libcublas|libnvidia'
    for f in gpu-pack/bin/*; do
      ldd "$f" | awk '/=>/ {print $3}' | { grep -vE "$skip" || true; }
    done | sort -u | while read -r lib; do cp -L "$lib" gpu-pack/lib/; done
    cp -r ../shared/models/stories260K gpu-pack/models/
    # The commit the binaries were built from (the GPU machine gets no .git).
    echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo -dirty)" >gpu-pack/COMMIT
    tar czf gpu-pack.tgz gpu-pack
    du -sh gpu-pack gpu-pack.tgz
    echo "carry gpu-pack.tgz; on the device: scripts/gpu-check.sh run (it unpacks it)"
    ;;
  run)
    unpack
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
    status=0
    for t in kernels_test kernels_attention_test cuda_backend_test service_gpu_test; do
      gpu-pack/bin/$t 2>&1 | tee "$out/$t.log" | tail -3 || status=1
    done
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    if [[ -x $sanitizer ]]; then
      # The f32 and CUDA-core attention tests run their kernels slowly enough under the
      # sanitizers to take minutes; the tensor-core, decode, SnapKV and digest kernels are the
      # ones with shared memory and warp-level hand-offs worth checking.
      "$sanitizer" --tool memcheck --error-exitcode 99 gpu-pack/bin/kernels_test \
        >"$out/sanitizer-memcheck-kernels.log" 2>&1 ||
        { status=1; tail -20 "$out/sanitizer-memcheck-kernels.log"; }
      for tool in memcheck racecheck; do
        "$sanitizer" --tool "$tool" --error-exitcode 99 gpu-pack/bin/kernels_attention_test \
          --gtest_filter='-*F32*:*OnCudaCores*' >"$out/sanitizer-$tool.log" 2>&1 ||
          { status=1; tail -20 "$out/sanitizer-$tool.log"; }
      done
      # The backend's own bookkeeping (uploads, gathers, appends) under memcheck.
      "$sanitizer" --tool memcheck --error-exitcode 99 gpu-pack/bin/cuda_backend_test \
        --gtest_filter='*GqaF32*:*GqaBf16*:CudaSession*' >"$out/sanitizer-backend.log" 2>&1 ||
        { status=1; tail -20 "$out/sanitizer-backend.log"; }
    fi
    exit $status
    ;;
  bench)
    unpack
    echo "commit $(cat gpu-pack/COMMIT 2>/dev/null || echo unknown)" | tee "$out/cuda_bench.md"
    gpu-pack/bin/cuda_bench "${@:2}" | tee -a "$out/cuda_bench.md"
    echo "commit $(cat gpu-pack/COMMIT 2>/dev/null || echo unknown)" | tee "$out/turn_host_bench.md"
    # 256- and 4096-token turns, then 256 with f32 blocks, with blocks inside RocksDB and with
    # blocks in a pool (plain memory standing in for pinned), to compare with the defaults (bf16
    # blocks in block files) on a server-class host.
    for flags in "--turn-tokens 256" "--turn-tokens 4096" "--turn-tokens 256 --block-dtype f32" \
                 "--turn-tokens 256 --block-files 0" "--turn-tokens 256 --pinned-bytes 6442450944"; do
      echo "flags: $flags" | tee -a "$out/turn_host_bench.md"
      # shellcheck disable=SC2086  # $flags is a list of flags
      KVMEM_MODEL="$PWD/gpu-pack/models/stories260K" gpu-pack/bin/turn_host_bench --shape 8b \
        --history 16384 --turns 4 --data /tmp/kvmem-turn-host-bench $flags |
        tee -a "$out/turn_host_bench.md"
    done
    ;;
  all)
    unpack
    deadline=$((SECONDS + ${2:-480}))
    summary="$out/summary.txt"
    {
      echo "commit $(cat gpu-pack/COMMIT 2>/dev/null || echo unknown)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
    } | tee "$summary"
    status=0
    # stage NAME LOG COMMAND...: runs COMMAND with what is left of the budget (less 10 s),
    # appending its output to LOG and one line to the summary.
    stage() {
      local name=$1 log=$2 left=$((deadline - SECONDS - 10)) start=$SECONDS rc=0
      shift 2
      if ((left < 20)); then
        echo "$name: skipped (out of time)" | tee -a "$summary"
        return
      fi
      local part="$out/.stage"
      timeout "$left" "$@" >"$part" 2>&1 || rc=$?
      { echo "=== $name"; cat "$part"; } >>"$log"
      ((rc == 0)) || status=1
      local what="ok"
      ((rc == 124)) && what="timed out"
      ((rc != 0 && rc != 124)) && what="failed (exit $rc)"
      # gtest's totals and, after them, the names of at most ten failed tests.
      echo "$name: $what in $((SECONDS - start)) s; $(
        grep -E '^\[  (PASSED|FAILED|SKIPPED) +\] [0-9]+ tests?' "$part" | tr '\n' ' '
        grep -E '^\[  FAILED  \] [A-Za-z]' "$part" | sort -u | head -10 | tr '\n' ' '
      )" | tee -a "$summary"
      rm -f "$part"
    }
    for t in kernels_test kernels_attention_test cuda_backend_test service_gpu_test; do
      stage "$t" "$out/tests.log" gpu-pack/bin/$t
    done
    echo "commit $(cat gpu-pack/COMMIT 2>/dev/null || echo unknown)" >"$out/cuda_bench.md"
    stage "cuda_bench 8b,1b" "$out/cuda_bench.md" gpu-pack/bin/cuda_bench --shapes 8b,1b
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    if [[ -x $sanitizer ]]; then
      stage "memcheck kernels_test" "$out/sanitizer.log" \
        "$sanitizer" --tool memcheck --error-exitcode 99 gpu-pack/bin/kernels_test
      for tool in memcheck racecheck; do
        stage "$tool kernels_attention_test" "$out/sanitizer.log" "$sanitizer" --tool "$tool" \
          --error-exitcode 99 gpu-pack/bin/kernels_attention_test \
          --gtest_filter='-*F32*:*OnCudaCores*'
      done
    fi
    # The benchmark's tables last, where the reply's tail shows them.
    grep -E '^\|' "$out/cuda_bench.md" || true
    cat "$summary"
    exit $status
    ;;
  *)
    echo "usage: scripts/gpu-check.sh pack|run|bench [cuda_bench flags]|all [seconds]" >&2
    exit 2
    ;;
esac
