#!/usr/bin/env bash
# The documented Fashion-MNIST run of the README (eps = 0.1 Linf, Song, Shokri & Mittal 2019's
# setting): clean and AutoAttack accuracy of ERM, PGD-AT and TRADES on the default 28x28 model.
# Reduced budget for a shared 2-core CPU machine: a 6,000-image pool (3,000 members), 10 epochs,
# PGD-20 on the first 1,000 test images, AutoAttack (standard) on the first 200.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs-fmnist-issue2}
for defense in erm pgd-at trades; do
  .venv/bin/cfbench run --defense "$defense" --dataset fashion-mnist --quiet --threads 1 --out "$OUT" \
    --evaluators clean,pgd,autoattack \
    --set data.pool_size=6000 --set epochs=10 --set pgd.n_examples=1000 --set autoattack.n_examples=200
done
