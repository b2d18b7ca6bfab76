#!/usr/bin/env bash
# Fashion-MNIST evidence of docs/cf_at.md (issue 6): the p sweep beside ERM and PGD-AT.  The DeMem
# runs (issue 5, scripts/fmnist_evidence_demem.sh) use the same protocol and folder, so the PGD-AT
# reference models serve both.  Protocol:
#   pool of 2,000 training-split images (1,000 members, 1,000 non-members), cnn28, Linf eps = 0.1,
#   15 epochs of SGD (lr 0.05, batch 64, cosine: 240 steps), clean accuracy on the 10,000 test images,
#   AutoAttack (standard) on the first 200 test images, the `mia` suite with 4 reference models per
#   recipe (shared by the seeds of a recipe), TPR at 5%, 2%, 1% and 0.1% FPR.
# Reduced for a 2-core CPU machine (the papers train on 60,000 images for 100+ epochs).
# Groups of runs are taken from a queue by JOBS workers (default 2), one torch thread per process;
# inside a group the runs are sequential, so a recipe's reference models are trained once.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-runs-fmnist-evidence}
JOBS=${JOBS:-2}
COMMON=(--dataset fashion-mnist --threads 1 --quiet --out "$OUT" --evaluators clean,autoattack,mia
        --set data.pool_size=2000 --set epochs=15 --set train.batch_size=64 --set mia.reference_models=4
        --set mia.fprs=0.05,0.02,0.01,0.001 --set autoattack.n_examples=200)
CF=(--set defense.steps=50 --set c_steps=2)   # cf-at's search: 50 FISTA iterations x 2 rounds of c (default 1000 x 2)

one() { echo "$(date -u +%T) start $*"; .venv/bin/cfbench run "$@" "${COMMON[@]}"; echo "$(date -u +%T) exit $? $*"; }
group() {
  case $1 in
    0) for p in 0.95 1.0 0.9 0.5 0; do one --defense cf-at --set p=$p "${CF[@]}"; done; one --defense erm ;;
    1) one --defense pgd-at --seed 0 ;;
  esac
}
NGROUPS=2
mkdir -p "$OUT"
QUEUE="$OUT/.queue"; echo 0 > "$QUEUE"
worker() {
  while true; do
    g=$(flock "$QUEUE" bash -c 'g=$(cat "$0"); echo $((g + 1)) > "$0"; echo $g' "$QUEUE")
    [ "$g" -ge "$NGROUPS" ] && return
    group "$g"
  done
}
for _ in $(seq "$JOBS"); do worker & done
wait
echo "$(date -u +%T) all done"
.venv/bin/python scripts/cfat_table.py "$OUT" fashion-mnist
