#!/usr/bin/env bash
# `make reference-save`: stage the reference sweeps' progress for a commit, so a sweep longer
# than its working copy's life (a session, a preemptible machine) resumes from a clean clone.
#
# Staged: every file `cfbench sweep GRID --list-state` names (the started, unfinished runs'
# folders; the reference models and half-trained checkpoints of every unfinished run, started
# or not -- the pool seed 0 of a recipe trained is the one its seeds 1 and 2 read; the cache's
# derived entries; these paths are git-ignored, hence -f), and every change under
# leaderboards/reference-runs (finished runs' folders, the deletion of checkpoints a finished
# run removed).  Unstaged (kept on disk): cache files staged by an earlier save that no
# unfinished run needs any more (a pool whose every run has finished).
# Nothing is committed: review `git status` and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
store=leaderboards/reference-runs
keep=$(mktemp)
trap 'rm -f "$keep"' EXIT
for grid in leaderboards/fashion-mnist_reference.toml leaderboards/digits_reference.toml; do
    .venv/bin/cfbench sweep "$grid" --out "$store" --list-state >> "$keep"
done
git add -A -- "$store"
if [ -s "$keep" ]; then
    xargs -r git add -f -- < "$keep"
fi
git ls-files -- "$store/_cache" | grep -vxF -f "$keep" | xargs -r git rm -q --cached -- || true
echo "reference-save: $(wc -l < "$keep") file(s) of unfinished runs staged; review with git status, then commit"
