#!/usr/bin/env bash
# The GPU check, one command on a machine with one CUDA GPU (under 8 minutes):
#   1. the Triton kernel tests on real CUDA (no interpreter): kernels against dense masked
#      PyTorch, the layers' Triton path, torch.compile tracing; and the stored-batch decode
#      on the GPU (data.decode_on) against the CPU's;
#   2. benchmarks/bench_triton.py, whose tables land in benchmarks/results/triton-*.{md,csv}
#      (it runs even when a test fails; the script then exits non-zero).
# Needs a CUDA build of torch 2.13 and Triton 3.9 in the environment: PYTHON=/path/to/python
# (default .venv/bin/python: ./setup.sh installs the CUDA build where nvidia-smi exists).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(realpath "${PYTHON:-.venv/bin/python}")
export TRITON_INTERPRET=0
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
'gpu_check.sh: no CUDA device visible to torch ' + torch.__version__ + '; run ./setup.sh on the GPU machine, \
or set PYTHON to a CUDA build of torch (README: Benchmarks)')" || exit 2
start=$(date +%s)
timeout 170 "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels tests/sparsity/test_block_layers.py \
    tests/data/test_codecs.py -k "(triton or kernels or compile or gpu) and not smoke"
tests=$?
echo "gpu_check.sh: kernel tests exit ${tests} after $(( $(date +%s) - start )) s"
timeout 280 "$PYTHON" benchmarks/bench_triton.py --budget 150
bench=$?
echo "gpu_check.sh: benchmark exit ${bench}; done in $(( $(date +%s) - start )) s"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
