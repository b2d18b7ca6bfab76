#!/usr/bin/env bash
# The documented Fashion-MNIST run of the README (eps = 0.1 Linf, Song, Shokri & Mittal 2019's
# setting): clean and AutoAttack accuracy of ERM, PGD-AT and TRADES on the default 28x28 model.
# Reduced budget for a 2-core CPU machine: a 20,000-image pool (10,000 members), 10 epochs,
# AutoAttack on the first 500 test images.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs-fmnist}
for defense in erm pgd-at trades; do
  .venv/bin/cfbench run --defense "$defense" --dataset fashion-mnist --quiet --out "$OUT" \
    --evaluators clean,pgd,autoattack \
    --set data.pool_size=20000 --set epochs=10 --set autoattack.n_examples=500
done
