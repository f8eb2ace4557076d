#!/usr/bin/env bash
# Reproduces the reference run of docs/simulation.md: builds kvmem-sim, replays the built-in
# synthetic scenario (16 sessions x 12 turns, seed 1) on stories260K under every strategy and
# hot budget, and refreshes docs/simulation/ (summary, scenario, plots). About a minute on a
# laptop core. Needs gnuplot (scripts/bootstrap.sh installs gnuplot-nox).
#   scripts/sim-reference.sh [build-dir]      (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
if ! command -v gnuplot >/dev/null; then
  echo "sim-reference: gnuplot not found; run scripts/bootstrap.sh (installs gnuplot-nox)" >&2
  exit 1
fi
if [[ ! -f $build/build.ninja ]]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >&2
fi
cmake --build "$build" --target kvmem_sim_main >&2

out=$build/sim-reference
rm -rf "$out"
"$build/bin/kvmem-sim" --synthetic --sessions 16 --turns 12 --facts 2 --seed 1 \
  --budgets 16,24,32,48,64,96,128,192,256 --reference-budget 64 \
  --window 8 --kernel 5 --recall-blocks 8 --threads 1 \
  --out "$out" --write-scenario "$out/scenario.json"

mkdir -p docs/simulation
cp "$out/summary.md" "$out/summary.csv" "$out/scenario.json" "$out"/sim_*.png docs/simulation/
echo "sim-reference: refreshed docs/simulation/ from $out" >&2
