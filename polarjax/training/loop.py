"""The training loop: data → model → optax steps → validation, checkpoints and logs.

``train(config, workdir)`` is what ``python -m experiments.train`` runs. See
docs/training.md for a walk-through.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

import polarjax
from polarjax.models import ModelSpec, boundary_of, build, spec_from_config
from polarjax.training.batches import BatchBuilder
from polarjax.training.checkpoint import Checkpoints
from polarjax.training.dataset import (DataError, check_species, fit_atomic_energies, read_frames, species_of,
                                       split_indices)
from polarjax.training.logging import MetricsLogger, ProgressBar
from polarjax.training.loss import ErrorAccumulator, stages_from_config, weights_at_step
from polarjax.training.optim import build_optimizer
from polarjax.training.state import TrainState, data_mesh, make_predict, make_train_step

RUN_FILES = ("config.json", "run_info.json")


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked (never overwritten silently)."""


def _config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def prepare_run_dir(workdir: str | Path, config_dict: dict, overwrite: bool) -> tuple[Path, bool]:
    """Create or reuse ``workdir``. Returns (path, resuming).

    * new or empty directory: a fresh run;
    * a previous run of the same config: resume from its latest checkpoint;
    * a previous run with a different config: error, unless ``overwrite`` — then the old
      directory is moved aside to ``<workdir>.old-<timestamp>`` (never deleted).
    """
    path = Path(workdir).resolve()
    if path.exists() and any(path.iterdir()):
        saved = path / "config.json"
        if overwrite:
            backup = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            suffix = 1
            while backup.exists():  # never move into (or over) an earlier backup of the same second
                backup = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
                suffix += 1
            shutil.move(str(path), str(backup))
            print(f"moved the existing run directory aside to {backup}")
        elif saved.exists():
            previous = json.loads(saved.read_text())
            if _comparable(previous) != _comparable(config_dict):
                raise RunDirectoryError(
                    f"{path} holds a run with a different config; use another --workdir, or --overwrite to move it "
                    f"aside (differences in: {sorted(_differences(previous, config_dict))})")
            return path, True
        else:
            raise RunDirectoryError(f"{path} exists, is not empty and is not a polarjax run directory; "
                                    "choose another --workdir or pass --overwrite to move it aside")
    path.mkdir(parents=True, exist_ok=True)
    return path, False


def _comparable(config: dict) -> dict:
    """Config without the keys that may change when resuming (budgets, logging)."""
    config = json.loads(json.dumps(config))
    for key in ("num_steps", "time_budget_minutes", "log_every"):
        config.get("train", {}).pop(key, None)
    return config


def _differences(a: dict, b: dict, prefix=""):
    keys = set(a) | set(b)
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            yield from _differences(va, vb, f"{prefix}{key}.")
        elif _comparable({"x": va}) != _comparable({"x": vb}) and key not in ("num_steps", "time_budget_minutes", "log_every"):
            yield f"{prefix}{key}"


def load_datasets(data_config) -> dict:
    """Read train/valid/test frames (explicit files or a seeded split of ``train_file``)."""
    label_keys = data_config.get("label_keys")
    keys = label_keys.to_dict() if hasattr(label_keys, "to_dict") else dict(label_keys or {})
    skip = bool(data_config.get("skip_invalid", False))
    train_file = data_config.get("train_file")
    if not train_file:
        raise DataError("config.data.train_file is not set")
    frames, report = read_frames(train_file, keys, skip_invalid=skip)
    reports = {"train_file": report}
    valid_file, test_file = data_config.get("valid_file"), data_config.get("test_file")
    if valid_file or test_file:
        datasets = {"train": frames, "valid": [], "test": []}
        for name, file in (("valid", valid_file), ("test", test_file)):
            if file:
                datasets[name], reports[f"{name}_file"] = read_frames(file, keys, skip_invalid=skip)
        if not valid_file:
            train_idx, valid_idx, _ = split_indices(len(frames), float(data_config.get("valid_fraction", 0.1)), 0.0,
                                                    int(data_config.get("split_seed", 0)))
            datasets["train"] = [frames[i] for i in train_idx]
            datasets["valid"] = [frames[i] for i in valid_idx]
    else:
        train_idx, valid_idx, test_idx = split_indices(
            len(frames), float(data_config.get("valid_fraction", 0.1)), float(data_config.get("test_fraction", 0.1)),
            int(data_config.get("split_seed", 0)))
        datasets = {"train": [frames[i] for i in train_idx], "valid": [frames[i] for i in valid_idx],
                    "test": [frames[i] for i in test_idx]}
    max_frames = data_config.get("max_train_frames")
    if max_frames:
        datasets["train"] = datasets["train"][: int(max_frames)]
    for name, report in reports.items():
        for index, reason in report.skipped:
            print(f"warning: skipped {report.path} frame {index} (data.skip_invalid=True): {reason}")
    datasets["reports"] = reports
    return datasets


def resolve_model_spec(model_config, train_frames) -> tuple[ModelSpec, dict]:
    """ModelSpec with species and E0 filled in from the training data when not given."""
    model_dict = _config_dict(model_config)
    species = model_dict.get("species") or species_of(train_frames)
    model_dict["species"] = [int(z) for z in species]
    check_species(train_frames, model_dict["species"])
    info = {}
    if model_dict.get("atomic_energies") is None:
        e0 = fit_atomic_energies(train_frames, model_dict["species"])
        model_dict["atomic_energies"] = [float(x) for x in e0]
        info["atomic_energies_fitted"] = True
    return spec_from_config(model_dict), model_dict


def train(config, workdir: str | Path, overwrite: bool = False) -> dict:
    """Train a model as described by ``config``; returns the final summary dict."""
    config_dict = _config_dict(config)
    if config.train.get("float64", False):
        jax.config.update("jax_enable_x64", True)
    run_dir, resuming = prepare_run_dir(workdir, config_dict, overwrite)
    datasets = load_datasets(config.data)
    spec, model_dict = resolve_model_spec(config.model, datasets["train"])
    for name in ("valid", "test"):
        check_species(datasets[name], spec.species)
    (run_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    run_info = {
        "polarjax_version": polarjax.__version__, "jax_version": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "model": model_dict,
        "datasets": {k: {"path": r.path, "sha256": r.fingerprint, "frames": r.num_frames, "skipped": r.skipped}
                     for k, r in datasets["reports"].items()},
        "split_sizes": {k: len(datasets[k]) for k in ("train", "valid", "test")},
    }
    (run_dir / "run_info.json").write_text(json.dumps(run_info, indent=2))

    dtype = np.float64 if config.train.get("float64", False) else np.float32
    model = build(spec)
    num_devices = int(config.train.get("num_devices", 0)) or jax.local_device_count()
    batch_size = int(config.train.batch_size)
    if batch_size % num_devices:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of the number of devices ({num_devices})")
    builder = BatchBuilder(spec, float(config.model.encoder_kwargs.cutoff), dtype=dtype)
    train_frames = datasets["train"]
    steps_per_epoch = max(1, len(train_frames) // batch_size)
    num_steps = int(config.train.num_steps)
    optimizer = build_optimizer(config.optim, num_steps)
    stages = stages_from_config(config.loss, num_steps)
    use_stress = max(stage["stress"] for stage in stages) > 0

    boundary = "mixed"
    boundaries = {boundary_of_frames(train_frames)}
    if len(boundaries) == 1:
        boundary = boundaries.pop()
    mesh = data_mesh(num_devices) if num_devices > 1 else None
    train_step = make_train_step(model, optimizer, boundary, config.loss.get("huber_delta"), use_stress,
                                 float(config.optim.get("ema_decay", 0.99)), mesh)
    predict = make_predict(model, "mixed", False)

    seed = int(config.train.get("seed", 0))
    example_graph, _ = builder.build(train_frames[:batch_size // num_devices])
    params = model.init(jax.random.PRNGKey(seed), example_graph)
    # flax creates float32 parameters; train.float64 means float64 parameters and optimizer state too.
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    ema_params = jax.tree_util.tree_map(jnp.copy, params)  # distinct buffers (the step donates its state)
    state = TrainState(params, optimizer.init(params), ema_params, jnp.asarray(0), jax.random.key_data(jax.random.PRNGKey(seed)),
                       jnp.asarray(0), jnp.asarray(0))
    checkpoints = Checkpoints(run_dir)
    best_metric, best_step = math.inf, -1
    if resuming:
        restored = checkpoints.restore_latest(state)
        if restored is not None:
            state, meta = restored
            best_metric, best_step = meta.get("best_metric", math.inf), meta.get("best_step", -1)
            print(f"resumed from {run_dir} at step {int(state.step)}")
    logger = MetricsLogger(run_dir, tensorboard=bool(config.train.get("tensorboard", True)))
    budget_s = 60.0 * float(config.train.get("time_budget_minutes", 0) or 0)
    eval_every = int(config.train.get("eval_every", 100))
    checkpoint_every = int(config.train.get("checkpoint_every", 100))
    patience = int(config.train.get("early_stopping_patience", 0) or 0)
    start_time = time.time()
    stop_reason = "num_steps"
    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        interrupted["flag"] = True
        print("\ninterrupt received: finishing the current step, saving a checkpoint and stopping", flush=True)

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    progress = ProgressBar(num_steps, int(state.step))

    def meta():
        return {"step": int(state.step), "best_metric": best_metric, "best_step": best_step,
                "polarjax_version": polarjax.__version__}

    try:
        while int(state.step) < num_steps:
            epoch, position = int(state.epoch), int(state.batch_in_epoch)
            if position >= steps_per_epoch:
                state = state._replace(epoch=state.epoch + 1, batch_in_epoch=jnp.zeros_like(state.batch_in_epoch))
                continue
            order = np.random.default_rng([seed, epoch]).permutation(len(train_frames))
            chosen = [train_frames[i] for i in order[position * batch_size:(position + 1) * batch_size]]
            shards, labels = builder.build_sharded(chosen, num_devices)
            weights = weights_at_step(stages, int(state.step))
            state, metrics = train_step(state, shards, labels, jnp.asarray(weights, dtype))
            step = int(state.step)
            metrics = {k: float(v) for k, v in metrics.items()}
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step}: {metrics}; the last checkpoint is kept")
            progress.update(step, metrics["loss"])
            if step % int(config.train.get("log_every", 10)) == 0:
                logger.log(step, "train", {**metrics, "compiles": builder.num_shapes})
            if step % eval_every == 0 or step == num_steps:
                errors = evaluate_frames(predict, builder, state.ema_params, datasets["valid"],
                                         int(config.train.get("eval_batch_size", batch_size)))
                logger.log(step, "valid", errors)
                progress.message(format_errors(f"step {step} valid", errors))
                metric = errors.get("energy_rmse_meV_per_atom", 0.0) + errors.get("forces_rmse_meV_per_A", 0.0)
                if metric < best_metric:
                    best_metric, best_step = metric, step
                    checkpoints.save_best(step, state, meta())
                elif patience and step - best_step >= patience * eval_every:
                    stop_reason = "early_stopping"
                    break
            if step % checkpoint_every == 0:
                checkpoints.save_latest(step, state, meta())
            if interrupted["flag"]:
                stop_reason = "interrupted"
                break
            if budget_s and time.time() - start_time > budget_s:
                stop_reason = "time_budget"
                break
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        checkpoints.save_latest(int(state.step), state, meta())
        progress.close()

    if best_step < 0:  # never validated: the final EMA parameters are the best we have
        checkpoints.save_best(int(state.step), state, meta())
    best = checkpoints.restore_best(state)
    best_params = best[0].ema_params if best is not None else state.ema_params
    best_params = jax.device_get(best_params)  # restored arrays are committed: avoid recompiling `predict`
    summary = {"stop_reason": stop_reason, "steps": int(state.step), "best_step": best_step,
               "train_time_s": time.time() - start_time, "num_compiled_shapes": builder.num_shapes,
               "split_sizes": run_info["split_sizes"]}
    for name in ("valid", "test"):
        if datasets[name]:
            summary[name] = evaluate_frames(predict, builder, best_params, datasets[name],
                                            int(config.train.get("eval_batch_size", batch_size)))
    summary["orientation"] = orient_run(run_dir, model, best_params, config, train_frames)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.log(int(state.step), "final", {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    logger.close()
    checkpoints.close()
    return summary


def orient_run(run_dir: Path, model, params, config, train_frames) -> dict:
    """Fix the global sign of the latent multipoles (see polarjax.training.orientation) from
    up to 64 training frames and store it in ``orientation.json``."""
    from polarjax.training.inference import LoadedModel
    from polarjax.training.orientation import orientation, write_orientation

    cutoff = float(config.model.encoder_kwargs.cutoff)
    dtype = np.float64 if config.train.get("float64", False) else np.float32
    loaded = LoadedModel(model, params, cutoff, config.to_dict() if hasattr(config, "to_dict") else dict(config),
                         run_dir, dtype)
    reference = str(config.train.get("orientation_reference", "") or "") or None
    frames = list(train_frames[:64])
    try:
        result = orientation(loaded, frames, reference)
    except ValueError as error:  # never lose a finished training over the sign convention
        result = {"latent_sign": 1.0, "error": str(error)}
        print(f"warning: the latent sign was not oriented ({error}); orient the run with "
              f"python -m experiments.orient --run {run_dir} --reference ELEMENT=SIGN")
    write_orientation(run_dir, result)
    if "reference" in result:
        print(f"latent sign: {result['latent_sign']:+.0f} ({result['reference']}; mean charges before "
              + ", ".join(f"{k} {v:+.3f}" for k, v in result["mean_charge_before"].items()) + ")")
    return result


def boundary_of_frames(frames) -> str:
    flags = {frame.periodic for frame in frames}
    if flags == {True}:
        return "periodic"
    if flags == {False}:
        return "open"
    return "mixed"


def evaluate_frames(predict, builder, params, frames, batch_size: int) -> dict:
    """RMSE/MAE of energy per atom (meV/atom) and forces (meV/Å), per-element force RMSE."""
    from ase.data import chemical_symbols

    acc = ErrorAccumulator()
    per_element: dict[int, ErrorAccumulator] = {}
    for start in range(0, len(frames), batch_size):
        chunk = frames[start:start + batch_size]
        graph, labels = builder.build(chunk)
        out = jax.device_get(predict(params, graph))
        offset = 0
        for g, frame in enumerate(chunk):
            n = frame.num_atoms
            if "energy" in frame.labels:
                acc.add("energy", 1e3 * (float(out["energy"][g]) - float(labels["energy"][g])) / n)
            if "forces" in frame.labels:
                residual = 1e3 * (np.asarray(out["forces"][offset:offset + n], np.float64) - frame.labels["forces"])
                acc.add("forces", residual)
                for z in np.unique(frame.numbers):
                    per_element.setdefault(int(z), ErrorAccumulator()).add("forces", residual[frame.numbers == z])
            offset += n
    result = acc.result()
    errors = {"n_frames": len(frames), "n_atoms": int(sum(f.num_atoms for f in frames))}
    rename = {"energy_rmse": "energy_rmse_meV_per_atom", "energy_mae": "energy_mae_meV_per_atom",
              "forces_rmse": "forces_rmse_meV_per_A", "forces_mae": "forces_mae_meV_per_A"}
    errors.update({rename[k]: v for k, v in result.items() if k in rename})
    errors["forces_rmse_meV_per_A_by_element"] = {chemical_symbols[z]: a.result()["forces_rmse"]
                                                  for z, a in sorted(per_element.items())}
    return errors


def format_errors(prefix: str, errors: dict) -> str:
    parts = [prefix]
    if "energy_rmse_meV_per_atom" in errors:
        parts.append(f"E RMSE {errors['energy_rmse_meV_per_atom']:.3f} meV/atom")
    if "forces_rmse_meV_per_A" in errors:
        parts.append(f"F RMSE {errors['forces_rmse_meV_per_A']:.2f} meV/Å")
    return " | ".join(parts)
