#!/usr/bin/env bash
# Evidence for docs/cf_at.md: counterfactual AT (cf-at) at p in {0.95, 1, 0.9, 0.5, 0} beside erm and
# pgd-at, all under one reduced digits protocol (2-core shared CPU): 15 epochs, 4 MIA reference models
# per recipe (TPR at 5%, 2% and 1% FPR: 649 non-members support nothing below 10/649), AutoAttack (standard, Linf eps 0.1) on the first 200 test images, one torch thread.
# cf-at's counterfactual search: 50 FISTA iterations x 2 rounds of c (paper/alibi defaults: 1000 x 2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=runs-cfat
COMMON=(--dataset digits --threads 1 --quiet --out "$OUT" --evaluators clean,autoattack,mia
        --set epochs=15 --set mia.reference_models=4 --set mia.fprs=0.05,0.02,0.01
        --set autoattack.n_examples=200)
CF=(--set defense.steps=50 --set c_steps=2)
run() { echo "$(date -u +%T) start $*"; .venv/bin/cfbench run "$@" "${COMMON[@]}"; local rc=$?; echo "$(date -u +%T) exit $rc $*"; }
run --defense cf-at --set p=0.95 "${CF[@]}"
run --defense cf-at --set p=1.0 "${CF[@]}"
run --defense cf-at --set p=0.9 "${CF[@]}"
run --defense cf-at --set p=0.5 "${CF[@]}"
run --defense cf-at --set p=0 "${CF[@]}"
run --defense erm
run --defense pgd-at
echo "$(date -u +%T) all done"
