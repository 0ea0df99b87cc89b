#!/usr/bin/env bash
# Bigger and longer variants of the HASYv2 recipe on fold 1, side by side on one CUDA GPU: does
# capacity, input size or schedule length reach 87% test top-1 where the 2-core CPU cannot
# train them? Each variant is `python -m benchmarks.hasy_recipe default --config FILE`, with
# its JSON under benchmarks/results/hasy_gpu_NAME.json, its log, and (at 86% or more) a float16
# copy of its model file.
#
#   bash benchmarks/hasy_gpu_sweep.sh OUT_DIR [VARIANT...]     # all variants when none named
#
# The variants share one decoded-image cache per input size, filled first, so their wall
# times leave out the first decode. PYTHON picks the interpreter (default python3). LIMIT is
# each variant's time limit in seconds (default 600), after which it is stopped and its log
# keeps the test accuracy of every epoch it finished. (Six variants side by side on one H200
# took about 17 s an epoch each, against 5 s for one alone: 30 epochs need about 9 minutes.) CONFIGS is the folder of the variants'
# files (default benchmarks/configs). The exit status is 1 if a variant failed.
set -u -o pipefail
out=${1:?give an output folder}
shift
python=${PYTHON:-python3}
limit=${LIMIT:-600}
configs=${CONFIGS:-benchmarks/configs}  # where hasy_gpu_NAME.yaml are
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(w64 w128 s48 s48_w64 e48 w64_l3)
mkdir -p "$out"
cache=$(mktemp -d)
status=0

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1 || true
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 \
    >"$out/gpu_util.csv" 2>/dev/null &
monitor=$!

# One decode per input size, before the variants start reading the cache.
"$python" -m benchmarks.hasy_recipe default --cache-dir "$cache" --fill-cache-only
"$python" -m benchmarks.hasy_recipe default --config "$configs/hasy_gpu_s48.yaml" \
    --cache-dir "$cache" --fill-cache-only

pids=()
threads=$(($(nproc) / ${#variants[@]}))
for name in "${variants[@]}"; do
    OMP_NUM_THREADS=$((threads > 0 ? threads : 1)) PYTHONUNBUFFERED=1 timeout "$limit" \
        "$python" -m benchmarks.hasy_recipe default \
        --config "$configs/hasy_gpu_$name.yaml" --name "hasy_gpu_$name" \
        --cache-dir "$cache" --no-progress --keep-model "$cache/models/$name.safetensors" \
        >"$out/$name.log" 2>&1 &
    pids+=($!)
done
for index in "${!pids[@]}"; do
    wait "${pids[$index]}" || { echo "${variants[$index]}: failed or stopped"; status=1; }
done
kill "$monitor" 2>/dev/null

cp benchmarks/results/hasy_gpu_*.json "$out/" 2>/dev/null
"$python" -m benchmarks.hasy_sweep_summary "$out" --configs "$configs" || status=1

# Float16 copies of the finished models at 86% or more, for evaluation elsewhere (test-time
# augmentation, int8 export) without another GPU run.
"$python" - "$cache/models" "$out" <<'EOF' || status=1
import json
import sys
from pathlib import Path

from cnnkit.inference.artifact import load_model, save_model

models, out = Path(sys.argv[1]), Path(sys.argv[2])
for path in sorted(models.glob("*.safetensors")):
    result = json.loads((out / f"hasy_gpu_{path.stem}.json").read_text())
    if result["test_top1"] >= 0.86:
        model = load_model(path)
        save_model(out / f"{path.stem}-fp16.safetensors", model, model.metadata, half=True)
EOF
rm -rf "$cache"
exit $status
