#!/usr/bin/env bash
# One device-tool call: the validation trainings of docs/results.md side by side on one GPU
# (run dirs come back as $OUT/runs.tgz), then the GPU MD benchmark (benchmarks/md.py).
# Expects .whl/ (wheels missing on the GPU image: e3nn-jax, jax-md, jraph, ml-collections, ase, vesin,
# tensorboardX) and .gpudata/ (copies of the ../shared/data files it trains on).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
MIN=${TRAIN_MINUTES:-3.5}
train() {  # name config extra-args...
  local name=$1 config=$2; shift 2
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 python3 -m experiments.train --config "$config" --workdir "runs/$name" \
      --config.train.time_budget_minutes=$MIN --config.train.tensorboard=False "$@" > "$OUT/$name.log" 2>&1 &
}
train dipep_uQiqiu configs/dipeptides.py --config.data.train_file=.gpudata/dipeptides_multipoles_train.xyz \
  --config.data.valid_file=.gpudata/dipeptides_multipoles_val.xyz --config.train.num_steps=3000 --config.train.eval_every=250
train dipep_les configs/dipeptides.py --config.data.train_file=.gpudata/dipeptides_multipoles_train.xyz \
  --config.data.valid_file=.gpudata/dipeptides_multipoles_val.xyz --config.model.variant=les --config.train.num_steps=5000 --config.train.eval_every=500
train water_uQiqiu configs/water.py --config.data.train_file=.gpudata/water_rpbe_d3.xyz --config.train.num_steps=3500 --config.train.eval_every=250
train water_c8_uQiqiu configs/water.py --config.data.train_file=.gpudata/water_rpbe_d3.xyz --config.model.encoder_kwargs.num_channels=8 --config.train.num_steps=3500 --config.train.eval_every=250
train water_alpha_uQiqiu configs/water_alpha.py --config.data.train_file=.gpudata/water_alpha.xyz --config.train.num_steps=2500 --config.train.eval_every=250
wait
tar czf "$OUT/runs.tgz" runs
for f in "$OUT"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -E "stopped|RMSE \(" | tail -5; done
timeout 100 python3 -m benchmarks.md --structure .gpudata/water_rpbe_d3.xyz --calls 3 --output "$OUT/md_gpu.json" 2>&1 | tee "$OUT/md_gpu.txt"
