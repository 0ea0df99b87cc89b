#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (under 10 minutes on one H100 or H200):
#   1. the `gpu`-marked tests (tests/gpu: AMP, GPU<->CPU checkpoints, CLI, transfer, memory, web);
#   2. the HASYv2 default recipe trained on the GPU (needs ../shared/data/HASYv2-dev.tar.bz2);
#   3. the tests that pick a device themselves, with CUDA as the automatic device.
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
result=benchmarks/results/hasy_default_cuda.json
rm -f "$result"  # Never hand on an older run's figures as this one's.
timeout 210 "$python" -m benchmarks.hasy_recipe default --name hasy_default_cuda 2>&1 \
    | tail -n 40 | tee "$logs/hasy_cuda.log" || status=1
[ -f "$result" ] && cp "$result" "$logs/"

echo "== 3. the tests that pick a device by themselves, CUDA as the automatic device"
# The CLI, the trainer, search, transfer, prediction and the end-to-end runs; the rest of the
# suite never asks for a device. (The whole suite took over 320 s with 8 workers.)
parallel=()  # pytest-xdist, where installed: one test module per worker.
"$python" -c "import xdist" 2>/dev/null && parallel=(-n 8 --dist loadfile)
timeout 300 "$python" -m pytest -m "not slow and not browser and not gpu" -q -p no:cacheprovider \
    "${parallel[@]}" tests/e2e tests/unit/test_cli.py tests/unit/test_trainer.py \
    tests/unit/test_search.py tests/unit/test_transfer_recipe.py tests/unit/test_predictor.py \
    tests/unit/test_runtime.py 2>&1 | tail -n 80 | tee "$logs/suite_cuda.log" || status=1
exit $status
