#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (under 10 minutes on one H100 or H200):
#   1. the `gpu`-marked tests (tests/gpu: AMP, GPU<->CPU checkpoints, CLI, transfer, memory, web);
#   2. the HASYv2 default recipe trained on the GPU (needs ../shared/data/HASYv2-dev.tar.bz2);
#   3. the default test suite with CUDA as the automatic device (`--device auto` picks it).
#
#   bash benchmarks/gpu_check.sh [LOG_DIR]     # logs and the recipe's JSON go to LOG_DIR
#
# PYTHON picks the interpreter (default python3); each step has its own time limit, so one
# slow step cannot eat the others' time. The exit status is 1 if any step failed.
set -u -o pipefail
logs=${1:-gpu-check}
python=${PYTHON:-python3}
mkdir -p "$logs"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$logs/gpu.txt"
"$python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
torch.cuda.get_device_name(), "bf16", torch.cuda.is_bf16_supported())' | tee -a "$logs/gpu.txt"

echo "== 1. gpu tests"
timeout 150 "$python" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider 2>&1 \
    | tee "$logs/gpu_tests.log" || status=1

echo "== 2. HASYv2 default recipe on the GPU"
timeout 210 "$python" -m benchmarks.hasy_recipe default --name hasy_default_cuda 2>&1 \
    | tail -n 40 | tee "$logs/hasy_cuda.log" || status=1
cp benchmarks/results/hasy_default_cuda.json "$logs/" 2>/dev/null

echo "== 3. default suite, CUDA as the automatic device"
parallel=()  # pytest-xdist, where installed: one test module per worker.
"$python" -c "import xdist" 2>/dev/null && parallel=(-n 4 --dist loadfile)
timeout 220 "$python" -m pytest -m "not slow and not browser and not gpu" -q -p no:cacheprovider \
    "${parallel[@]}" 2>&1 | tail -n 80 | tee "$logs/suite_cuda.log" || status=1
exit $status
