#!/usr/bin/env bash
# GPU checks and benchmarks, from the repository root on a CUDA machine:
#   bash benchmarks/run_gpu.sh [RESULT_DIR]          (default benchmarks/results)
# 1. the GPU tests (`pytest -m gpu`: CUDA identity and counts, no host syncs under
#    torch.cuda.set_sync_debug_mode("error")),
# 2. python -m benchmarks on CUDA: fp32 (forward ratio, step cost, training step, batched sweep),
#    bf16 (forward ratio, incl. identity-wrapped == unwrapped bit for bit),
# 3. optionally (CPU2=1) the CPU suite pinned to two cores of the host (an idle 2-core reference).
# Wheels in build/gpu-wheels (e.g. the transformers version the project is tested with) are
# installed first into /tmp/site when that folder exists (machines without network access).
set -u
RESULTS=${1:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G "build/gpu-wheels/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        build/gpu-wheels/*.whl && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
    || echo "editable install failed; relying on PYTHONPATH" >&2
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')" | tee "$RESULTS/gpu_env.txt"

timeout 120 $PY -m pytest -q -m gpu tests -p no:cacheprovider -rs --durations=5 2>&1 \
    | tee "$RESULTS/gpu_pytest_no_host_sync.txt" | tail -15
timeout 220 $PY -m benchmarks --device cuda --dtype float32 --out "$RESULTS" 2>&1 | tail -40
timeout 90 $PY -m benchmarks --device cuda --dtype bfloat16 --only forward_overhead --out "$RESULTS" 2>&1 | tail -12
if [ "${CPU2:-0}" = 1 ]; then
    timeout "${CPU2_TIMEOUT:-200}" taskset -c 0,1 $PY -m benchmarks --threads 2 --out "$RESULTS" --prefix cpu2host_ \
        --only forward_overhead controller_step training_step sweep_batched 2>&1 | tail -30
fi
