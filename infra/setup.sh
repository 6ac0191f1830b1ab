#!/usr/bin/env bash
# Set up a fresh machine: Fashion-MNIST from Debian, then .venv with the locked versions.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  echo "setup: installing Debian's dataset-fashion-mnist into $FMNIST_DIR"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
# pip 23 backtracks for many minutes on this stack; a current pip resolves it in one pass.
.venv/bin/python -m pip install -q --upgrade "pip>=25"
echo "setup: installing ssl-pipeline and its locked dependencies (about 3 minutes the first time)"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
touch .venv/.installed
