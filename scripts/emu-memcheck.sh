#!/usr/bin/env bash
# Memcheck without a GPU: builds the CUDA emulator's tests with AddressSanitizer into
# build-asan/ and runs them. A kernel that reads or writes past a device buffer (or any host
# code that does) is reported with its file and line, as compute-sanitizer's memcheck would on
# a device. Takes about half an hour on 2 cores the first time (everything is built with ASan).
#   scripts/emu-memcheck.sh [gtest filter]
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address" >/dev/null
tests=(cuda_emulator_test kernels_test_emu kernels_attention_test_emu cuda_backend_test_emu)
cmake --build build-asan -j "$(nproc)" --target "${tests[@]}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
status=0
for t in "${tests[@]}"; do
  echo "== $t"
  build-asan/bin/$t --gtest_filter="${1:-*}" 2>&1 | tail -3 || status=1
done
exit $status
