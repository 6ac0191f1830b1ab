#!/usr/bin/env bash
# Re-resolve the dependencies from pyproject.toml in a scratch venv and rewrite constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3.11 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade "pip>=25"
"$tmp/venv/bin/python" -m pip install -q -e ".[dev]"
{
  sed -n '1,/^# sqlalchemy/p' constraints.txt
  "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v -E '^(ssl-pipeline|pip)=='
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" constraints.txt
echo "constraints.txt rewritten; review the diff and run the tests"
