#!/usr/bin/env bash
# Fashion-MNIST spot check for docs/cf_at.md (the full digits protocol with reference models is too
# expensive here: one cf-at generation on 2,000 28x28 members costs ~20 min on this CPU, and every
# membership reference model needs its own). Reduced: a 2,000-image pool (1,000 members), 10 epochs,
# no reference models (threshold and robustness-based attacks only), AutoAttack on 200 test images.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=runs-cfat
COMMON=(--dataset fashion-mnist --threads 1 --quiet --out "$OUT" --evaluators clean,autoattack,mia
        --set data.pool_size=2000 --set epochs=10 --set mia.reference_models=0 --set mia.fprs=0.05,0.02,0.01
        --set autoattack.n_examples=200)
run() { echo "$(date -u +%T) start $*"; .venv/bin/cfbench run "$@" "${COMMON[@]}"; local rc=$?; echo "$(date -u +%T) exit $rc $*"; }
run --defense cf-at --set p=0.95 --set defense.steps=50 --set c_steps=2
run --defense erm
echo "$(date -u +%T) all done"
