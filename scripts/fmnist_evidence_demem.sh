#!/usr/bin/env bash
# Fashion-MNIST evidence of docs/demem.md (issue 5): PGD-AT, DeMem+PGD-AT, the same penalty on all
# samples, and DP-AT, 3 seeds each.  The protocol of scripts/fmnist_evidence.sh (2,000-image pool,
# cnn28, 15 epochs, batch 64, 4 reference models per recipe shared by the seeds) except AutoAttack
# on the first 100 test images instead of 200 (time: AutoAttack on a PGD-AT model costs ~8 CPU-min
# per 200 images here).  Same folder, so the cf-at sweep's cache is shared.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-runs-fmnist-evidence}
JOBS=${JOBS:-2}
COMMON=(--dataset fashion-mnist --threads 1 --quiet --out "$OUT" --evaluators clean,autoattack,mia
        --set data.pool_size=2000 --set epochs=15 --set train.batch_size=64 --set mia.reference_models=4
        --set mia.fprs=0.05,0.02,0.01,0.001 --set autoattack.n_examples=100)

one() { echo "$(date -u +%T) start $*"; .venv/bin/cfbench run "$@" "${COMMON[@]}"; echo "$(date -u +%T) exit $? $*"; }
group() {
  case $1 in
    0) for s in 0 1 2; do one --defense pgd-at --seed $s; done ;;
    1) for s in 0 1 2; do one --defense demem --set base=pgd-at --seed $s; done ;;
    2) for s in 0 1 2; do one --defense demem --set base=pgd-at --set select=all --seed $s; done ;;
    3) for s in 0 1 2; do one --defense dp-at --set target_epsilon=8 --seed $s; done ;;
  esac
}
NGROUPS=4
mkdir -p "$OUT"
QUEUE="$OUT/.queue-demem"; echo 0 > "$QUEUE"
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
.venv/bin/python scripts/demem_summary.py "$OUT"
