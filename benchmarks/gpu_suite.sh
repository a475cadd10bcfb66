#!/usr/bin/env bash
# The GPU benchmarks of the speed issue in one command, for a short lease of a CUDA machine:
#   1. the bf16 matrix-product rate of the card (the practical MFU ceiling, next to the datasheet's 989 TFLOP/s);
#   2. SD-1.5 U-Net at 256 px, batch 32, bf16 autocast: images/s, MFU, activation memory, with and without gradient
#      checkpointing, ours vs diffusers (benchmarks/sd15_memory.py);
#   3. the U-Net training step vs diffusers for the quickstart and reduced-width SD-1.5 topologies (unet_step.py);
#   4. DPM-Solver++(2M) sampling vs diffusers with the same weights (sampling_speed.py);
#   5. (2) with torch.compile and channels_last at batch 96 (the best MFU measured, 34.1 % on an H200, 2026-12-04),
#      our U-Net alone, without checkpointing.
#
#   OUT=results bash benchmarks/gpu_suite.sh
#
# Needs only torch (diffusers optional: without it, steps 2-4 time our U-Net alone or are skipped). Wheels found
# in .whl/ (e.g. diffusers for a machine without it) are installed into /tmp/site first. Each step has its own
# time limit and writes $OUT/<step>.txt, so a slow step costs only itself.
set -uo pipefail
OUT=${OUT:-gpu_results}
PY=${PY:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME SECONDS ARGS...: run python with ARGS under a time limit, output to the terminal and $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $PY $*"
    local start=$SECONDS
    timeout "$limit" "$PY" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    grep -v -E "Warning|warn\(|^\s*$" "$OUT/$name.txt" | tail -n 25
    echo "== $name: exit $rc after $((SECONDS - start))s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  $PY -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -n 1; } | tee "$OUT/machine.txt"

step matmul 60 -c "
import torch
a, b = (torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16) for _ in range(2))
for _ in range(3): a @ b
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20): a @ b
end.record(); torch.cuda.synchronize()
print(f'bf16 8192^3 matmul: {2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12:.0f} TFLOP/s (mean of 20, random data)')
"
step sd15 200 benchmarks/sd15_memory.py --device cuda
step unet_step 120 benchmarks/unet_step.py --device cuda --bf16
step sampling 90 benchmarks/sampling_speed.py --device cuda --bf16 --images 8
step sd15_compiled 240 benchmarks/sd15_memory.py --device cuda --batch 96 --repeats 10 --compile --channels-last \
    --no-checkpointing --no-diffusers
