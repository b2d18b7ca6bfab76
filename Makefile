# The README's two commands: `make demo` and `make test`.  Both set up everything first.
.PHONY: setup demo test test-fast bench reference reference-save

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

# The reference leaderboards (VALIDATION.md "Reference leaderboards"): both sweep files in one
# pool, Fashion-MNIST's runs first (a free worker helps them before a digits run starts), each
# resuming where it stopped (finished runs are skipped by hash).  Long on a CPU.
reference: setup
	OMP_NUM_THREADS=1 .venv/bin/cfbench sweep leaderboards/fashion-mnist_reference.toml leaderboards/digits_reference.toml --out leaderboards/reference-runs --leaderboards leaderboards

# Stage the unfinished reference runs' progress (run folders, reference models, checkpoints) for
# a commit, so `make reference` on a clean clone of that commit resumes where this one stopped.
reference-save: setup
	@bash scripts/reference_save.sh
