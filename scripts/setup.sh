#!/usr/bin/env bash
# Set up everything cfbench needs on a fresh machine, idempotently:
#   * a virtual environment in .venv with the CPU build of torch 2.13.0 (a bare `torch`
#     requirement would pull a multi-GB CUDA build), cfbench (editable) and its test tools;
#   * where apt is available (and we are root): the Debian package dataset-fashion-mnist
#     (the original Fashion-MNIST IDX files) and, with CFBENCH_BROWSER=1, headless Chromium
#     for the report's browser test.
# Safe to run again: each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "cfbench setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.cfbench-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "cfbench setup: installing torch==2.13.0 (CPU) and cfbench"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[test,ray]"   # ray: the sweep executor (and its CI test)
  touch "$stamp"
fi
# torchattacks (the `attacks` evaluator) without its dependencies: its requests~=2.25.1 pin and
# torchvision (which would pull another torch) serve only its bundled RobustBench loaders
if ! "$VENV/bin/python" -c "import torchattacks" >/dev/null 2>&1; then
  echo "cfbench setup: installing torchattacks==3.5.1 (--no-deps)"
  "$VENV/bin/python" -m pip install -q --no-deps "torchattacks==3.5.1" \
    || echo "cfbench setup: warning: could not install torchattacks; the attacks evaluator is unavailable" >&2
fi

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "cfbench setup: apt-get install ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "cfbench setup: warning: could not install ${missing[*]} with apt-get" >&2
  else
    echo "cfbench setup: note: ${missing[*]} not installed (needs apt-get as root); see README.md" >&2
  fi
}
if command -v dpkg >/dev/null 2>&1; then
  apt_install dataset-fashion-mnist
  if [ "${CFBENCH_BROWSER:-0}" = 1 ]; then
    apt_install chromium chromium-driver
  fi
fi
echo "cfbench setup: ready ($("$VENV/bin/python" -c 'import cfbench, torch; print("cfbench", cfbench.__version__, "torch", torch.__version__)'))"
