#!/bin/sh
# Validation of the membership-inference evaluator against Song, Shokri & Mittal (2019), Fashion-MNIST.
cd /work/main
COMMON="--dataset fashion-mnist --evaluators clean,pgd,mia --set data.pool_size=4000 --set epochs=10 --set mia.reference_models=4 --set pgd.n_examples=2000 --out /work/main/runs-fmnist --quiet"
date
OMP_NUM_THREADS=1 /usr/bin/time -v .venv/bin/cfbench run --defense erm $COMMON
date
OMP_NUM_THREADS=1 /usr/bin/time -v .venv/bin/cfbench run --defense pgd-at --set defense.steps=8 --set defense.step_size=0.02 $COMMON
date
