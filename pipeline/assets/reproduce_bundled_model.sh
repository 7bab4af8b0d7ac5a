#!/usr/bin/env bash
# Reproduces pipeline/assets/fashion_mnist_cnn.pt and its report: the custom CNN trained by the default recipe
# ("small" preset, no flags) on Fashion-MNIST's training split (Debian package dataset-fashion-mnist, MIT licence)
# and scored on its 10,000-image test split, which `invsort train` keeps as the test split (DIR/test/).
set -euo pipefail
work=${1:-/tmp/invsort-fashion-mnist}
assets=$(cd "$(dirname "$0")" && pwd)
invsort data fashion-mnist "$work/data/train" --split train
invsort data fashion-mnist "$work/data/test" --split test
invsort train "$work/data" --out "$work/fashion_mnist_cnn.pt" --no-progress
invsort evaluate "$work/fashion_mnist_cnn.pt" "$work/data/test" --out "$work/report"
if [ "${INSTALL:-0}" = 1 ]; then
  cp "$work/fashion_mnist_cnn.pt" "$assets/fashion_mnist_cnn.pt"
  cp "$work/fashion_mnist_cnn.card.md" "$assets/fashion_mnist_cnn.card.md"
  rm -rf "$assets/fashion_mnist_report" && cp -r "$work/report" "$assets/fashion_mnist_report"
  invsort export-onnx "$assets/fashion_mnist_cnn.pt"  # fashion_mnist_cnn.onnx + .onnx.json: runs without torch
fi
