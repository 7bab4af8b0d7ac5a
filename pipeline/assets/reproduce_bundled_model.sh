#!/usr/bin/env bash
# Reproduces pipeline/assets/fashion_mnist_cnn.pt: the custom CNN trained on Fashion-MNIST's training split
# (Debian package dataset-fashion-mnist, MIT licence) and scored on its 10,000-image test split.
set -euo pipefail
work=${1:-/tmp/invsort-fashion-mnist}
invsort data fashion-mnist "$work/train" --split train
invsort data fashion-mnist "$work/test" --split test
invsort train "$work/train" --out "$work/fashion_mnist_cnn.pt" --arch invsort_cnn --grayscale --image-size 28 \
    --epochs 10 --batch-size 128 --lr 2e-3 --val-fraction 0.1 --seed 0
INVSORT_LOCAL_ROOTS="$work" invsort sort "$work/test" --model "$work/fashion_mnist_cnn.pt" \
    --db "sqlite:///$work/test.db" --no-progress
