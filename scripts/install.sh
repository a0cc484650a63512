#!/usr/bin/env bash
# Creates .venv in the project root and installs medcl into it.
# torch==2.13.0 first: a CPU build pip finds locally; installing the project first would pull a
# multi-GB CUDA build through the dependency resolver.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "medcl installed in $(pwd)/.venv"
