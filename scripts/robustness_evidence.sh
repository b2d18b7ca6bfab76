#!/usr/bin/env bash
# Evidence for docs/robustness.md: digits ERM, PGD-AT, TRADES and three gradient-masking fixtures
# (tests/fixtures/masking_plugins.py), each with PGD, AutoAttack and the torchattacks zoo, and the
# fixture whose input transform is a forward pre-hook (refused when its model is saved).
# One CPU thread per run, one run at a time (2-core shared machine): about 40 min in all on a quiet machine.
#   bash scripts/robustness_evidence.sh            # then: see the leaderboard commands at the end
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs-evidence-robust}
PLUGIN=tests/fixtures/masking_plugins.py
# the zoo without its two slowest attacks (SPSA ~400 s, EOT-PGD ~120 s per model here; the
# full list ran on ERM: docs/robustness.md); Square stays as the gradient-free attack
ZOO=${ZOO:-apgd-ce,cw-l2,deepfool,fab,square}
COMMON=(--dataset digits --evaluators clean,pgd,autoattack,attacks --set epochs=15 --set "attacks.attacks=$ZOO"
        --threads 1 --quiet --out "$OUT" --plugin "$PLUGIN")
run() { echo "== cfbench run $*"; .venv/bin/cfbench run "$@" "${COMMON[@]}"; echo "exit $?"; }
run --defense erm
run --defense pgd-at
run --defense trades
run --defense mask-x1000
run --defense erm --model cnn8-round
run --defense erm --model cnn8-hf
run --defense mask-prehook-round    # expected: the run fails at save time (ModelReloadError)
[ "${RUNS_ONLY:-0}" = 1 ] && exit 0
# the masks on cnn8-round / cnn8-hf are other models, hence other protocols: one table each
.venv/bin/cfbench leaderboard --dataset digits --runs "$OUT" --out "$OUT/leaderboards" --quiet
.venv/bin/cfbench leaderboard --dataset digits --runs "$OUT" --out "$OUT/leaderboards-all" --include-flagged --quiet
for d in "$OUT"/digits-*; do [ -f "$d/record.json" ] && .venv/bin/cfbench --plugin "$PLUGIN" report "$d" --out "$d/report.html"; done
