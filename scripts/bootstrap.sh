#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks (apt), then configures and builds kvmem into
# build/ (binaries in build/bin/). Safe to run again: it installs and rebuilds only what changed.
#   scripts/bootstrap.sh [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake ninja-build ccache pkg-config git
          libabsl-dev libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
          librocksdb-dev libsentencepiece-dev libgtest-dev libgmock-dev libopenblas-dev
          nlohmann-json3-dev libssl-dev gnuplot-nox
          python3 python3-grpcio python3-protobuf)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}" >&2
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# nvcc (CUDA 13) builds the CUDA backend wherever it is installed; the build works without it.
export PATH="$PATH:/usr/local/cuda/bin"
if [[ ! -f build/build.ninja ]]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >&2
fi
cmake --build build -j "$(nproc)" >&2
