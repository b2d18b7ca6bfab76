#!/usr/bin/env bash
# Rebuilds the committed digits leaderboard (leaderboards/) and example reports (reports/).
# Budget reduced for a shared 2-core machine: 4 reference models, AutoAttack on 100 test images.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=leaderboards/runs
for defense in erm pgd-at trades; do
  .venv/bin/cfbench run --defense "$defense" --dataset digits --quiet --threads 1 --out "$RUNS" \
    --set mia.reference_models=4 --set autoattack.n_examples=100 &
done
wait
.venv/bin/cfbench leaderboard --dataset digits --runs "$RUNS"
