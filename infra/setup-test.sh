#!/usr/bin/env bash
# What the tests need beyond infra/setup.sh: Debian's Chromium, for the headless-browser test of the MLflow
# UI (tests/test_mlflow_ui.py). About 30 s and 460 MB the first time; nothing if it is already there.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-test: apt-get not found: install Chromium yourself (or set CHROMIUM=/path/to/chrome)," \
    "or the MLflow UI test is skipped" >&2
  exit 0
fi
echo "setup-test: installing Debian's chromium (for the headless-browser test of the MLflow UI)"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
