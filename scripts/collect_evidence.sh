#!/usr/bin/env bash
# Copy the finished runs of an evidence sweep's --out folder into evidence/<name>/ (committed):
# record.json, report.html, the target model and its splits -- what the tables are made from and
# what a later `cfbench sweep --out evidence/<name>` needs to skip the finished runs.  Caches,
# checkpoints and resumable state stay behind.
#   bash scripts/collect_evidence.sh runs-evidence-inversion inversion-digits
set -euo pipefail
src=$1; name=$2
dst="$(dirname "$0")/../evidence/$name"
mkdir -p "$dst"
for rec in "$src"/*/record.json; do
  [ -f "$rec" ] || continue
  run=$(dirname "$rec"); id=$(basename "$run")
  grep -q '"status": "ok"' "$rec" || { echo "skip $id (not ok)"; continue; }
  mkdir -p "$dst/$id"
  for f in record.json report.html model.safetensors splits.npz; do
    [ -f "$run/$f" ] && cp -p "$run/$f" "$dst/$id/$f.tmp" && mv "$dst/$id/$f.tmp" "$dst/$id/$f"
  done
  echo "collected $id"
done
