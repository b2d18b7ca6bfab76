#!/usr/bin/env bash
# The DeMem evidence of docs/demem.md: digits, 3 seeds, PGD-AT / DP-AT / DeMem and its ablations,
# then the tables (scripts/demem_summary.py).  AutoAttack on the first 200 test images (time).
# One thread per process: on the shared 2-core machine two OpenMP threads per process under load
# slowed training ~30x.  The runs of one recipe share its 8 membership reference models (cache).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${1:-runs-demem}
COMMON=(--dataset digits --evaluators clean,autoattack,mia --set autoattack.n_examples=200 --set mia.reference_models=8
        --set mia.fprs=0.05,0.02,0.01,0.001 --out "$OUT" --quiet)
for s in 0 1 2; do
  .venv/bin/cfbench run --defense pgd-at --seed $s "${COMMON[@]}"
  .venv/bin/cfbench run --defense dp-at --set target_epsilon=8 --seed $s "${COMMON[@]}"
  .venv/bin/cfbench run --defense demem --set base=pgd-at --seed $s "${COMMON[@]}"                     # DeMem
  .venv/bin/cfbench run --defense demem --set base=pgd-at --set select=all --seed $s "${COMMON[@]}"    # ablation
  .venv/bin/cfbench run --defense demem --set base=pgd-at --set select=random --seed $s "${COMMON[@]}" # control
  .venv/bin/cfbench run --defense demem --set base=pgd-at --set risk=oracle --seed $s "${COMMON[@]}"   # oracle
  .venv/bin/cfbench run --defense demem --set base=pgd-at --set flood=none --seed $s "${COMMON[@]}"    # 1st default
done
.venv/bin/python scripts/demem_summary.py "$OUT"
