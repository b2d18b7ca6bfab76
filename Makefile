# The README's two commands: `make demo` and `make test`.  Both set up everything first.
.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/cfbench run --defense pgd-at --dataset digits

# The full suite, slow end-to-end checks and the browser test included.
test:
	@CFBENCH_BROWSER=1 bash scripts/setup.sh
	.venv/bin/python -m pytest -m "" -q

test-fast: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python -m pytest benchmarks/ --benchmark-only --benchmark-columns=min,median,max,rounds -q
