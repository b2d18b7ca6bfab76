#!/bin/bash
# Baselines of the DeMem evidence (digits, 3 seeds): PGD-AT and DP-AT.
cd /work/main
COMMON="--dataset digits --evaluators clean,autoattack,mia --set autoattack.n_examples=200 --set mia.fprs=0.05,0.02,0.01,0.001 --out /work/main/runs-demem --quiet"
for s in 0 1 2; do
  echo "=== pgd-at seed $s $(date)"; .venv/bin/cfbench run --defense pgd-at --seed $s $COMMON
done
for s in 0 1 2; do
  echo "=== dp-at seed $s $(date)"; .venv/bin/cfbench run --defense dp-at --set target_epsilon=8 --seed $s $COMMON
done
echo "=== done $(date)"
