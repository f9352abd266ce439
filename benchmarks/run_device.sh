#!/usr/bin/env bash
# The GPU benchmark session (one call of the device tool): electrostatics and model benchmarks.
# Expects wheels of the packages missing on the GPU image in .whl/ and the water file in .gpudata/.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import jax; print(jax.__version__, jax.devices())"
timeout 200 python3 -m benchmarks.electrostatics --repeats 10 --output "$OUT/electrostatics_gpu.json" 2>&1 | tee "$OUT/electrostatics_gpu.txt"
timeout 280 python3 -m benchmarks.model --backend gpu --systems water nacl --batch-sizes 1 8 --variants sr les uQiqiu \
    --water .gpudata/water_rpbe_d3.xyz --markdown --output "$OUT/model_gpu.json" 2>&1 | tee "$OUT/model_gpu.txt"
