#!/usr/bin/env bash
# Set up a fresh machine: Fashion-MNIST and jemalloc from Debian, then .venv with the locked versions.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/datasets/fashion-mnist
# jemalloc: the allocator of Ray's workers (ray.worker_allocator); without it they use the system's.
missing=()
[ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] || missing+=(dataset-fashion-mnist)
ldconfig -p 2>/dev/null | grep -q libjemalloc.so.2 || missing+=(libjemalloc2)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: apt-get not found: install ${missing[*]} yourself (or put Fashion-MNIST's IDX files" \
      "where data.fashion_mnist_dir points); jemalloc is optional" >&2
  else
    echo "setup: installing Debian's ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  fi
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
