#!/usr/bin/env bash
# Set up dsparse in ./.venv (idempotent). Usage: ./setup.sh
#
# torch is pinned to 2.13.0 in pyproject.toml. On a machine without an NVIDIA GPU this
# script makes sure the CPU build is what gets installed: a local wheel on pip's
# find-links path if there is one (this workplace keeps it in /opt/wheels), otherwise
# PyTorch's CPU index. It never lets pip resolve the multi-GB CUDA build there.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" "torch==2.13.0"
  elif ls ${PIP_FIND_LINKS:-/opt/wheels}/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    "${PIP[@]}" "torch==2.13.0"               # the CPU wheel on the find-links path
  else
    "${PIP[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${PIP[@]}" -e ".[test]"
.venv/bin/python - <<'PY'
import torch
build = "CUDA " + torch.version.cuda if torch.version.cuda else "CPU"
print(f"dsparse set up: torch {torch.__version__} ({build} build) in .venv")
PY
