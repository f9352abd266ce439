"""Loading trained runs and predicting on new structures.

``load_model(run_dir)`` → :class:`LoadedModel`, a ready energy/properties function built
from the best (EMA) parameters of a run directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from polarjax.models import Model, build, spec_from_config
from polarjax.training.batches import BatchBuilder
from polarjax.training.dataset import Frame


@dataclasses.dataclass
class LoadedModel:
    """A trained model: spec, parameters and jitted predictions on frames."""

    model: Model
    params: object
    cutoff: float
    config: dict
    run_dir: Path
    dtype: type = np.float32

    def __post_init__(self):
        self.builder = BatchBuilder(self.model.spec, self.cutoff, dtype=self.dtype)
        self._predict = {}

    @property
    def spec(self):
        return self.model.spec

    def predict_fn(self, boundary: str, stress: bool):
        key = (boundary, stress)
        if key not in self._predict:
            model = self.model
            self._predict[key] = jax.jit(lambda p, g, f: model.properties(
                p, g, external_field=f, boundary=boundary, stress=stress, include_e0=False))
        return self._predict[key]

    def predict(self, frames: Sequence[Frame], external_field=None) -> list[dict]:
        """Per-frame predictions (numpy): energy, forces, stress (periodic), charges, dipoles,
        quadrupoles, kappa, alpha, induced_charges, induced_dipoles, energy_sr, energy_lr."""
        graph, _ = self.builder.build(frames)
        periodic = {f.periodic for f in frames}
        boundary = "mixed" if len(periodic) > 1 else ("periodic" if periodic == {True} else "open")
        field = None
        if external_field is not None:
            field = jnp.broadcast_to(jnp.asarray(external_field, graph.positions.dtype), (graph.cell.shape[0], 3))
        out = jax.device_get(self.predict_fn(boundary, True in periodic)(self.params, graph, field))
        results, offset = [], 0
        for g, frame in enumerate(frames):
            n = frame.num_atoms
            item = {}
            for key, value in out.items():
                if key == "terms":
                    item["terms"] = {k: float(v[g]) for k, v in value.items()}
                elif np.ndim(value) >= 1 and np.shape(value)[0] == graph.positions.shape[0]:
                    item[key] = np.asarray(value[offset:offset + n])
                elif np.ndim(value) >= 1 and np.shape(value)[0] == graph.cell.shape[0]:
                    item[key] = np.asarray(value[g])
            offset += n
            # E0 is added on the host in float64 (totals ~1e5 eV lose precision in float32).
            item["energy"] = float(item["energy"]) + self.builder.reference_energy(frame)
            item["energy_e0"] = self.builder.reference_energy(frame)
            results.append(item)
        return results


def load_model(run_dir: str | Path, which: str = "best") -> LoadedModel:
    """Load a run directory's ``best`` (default) or ``latest`` EMA parameters, with the global
    sign of the latent multipoles from its ``orientation.json`` (+1 if the run has none; see
    :mod:`polarjax.training.orientation`)."""
    from polarjax.training.checkpoint import Checkpoints

    run_dir = Path(run_dir)
    info_path = run_dir / "run_info.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a polarjax run directory (no run_info.json)")
    info = json.loads(info_path.read_text())
    config = json.loads((run_dir / "config.json").read_text())
    if config.get("train", {}).get("float64", False):
        jax.config.update("jax_enable_x64", True)
    from polarjax.training.orientation import read_latent_sign

    spec = dataclasses.replace(spec_from_config(info["model"]), latent_sign=read_latent_sign(run_dir))
    model = build(spec)
    cutoff = float(config["model"]["encoder_kwargs"]["cutoff"])
    dtype = np.float64 if config.get("train", {}).get("float64", False) else np.float32
    checkpoints = Checkpoints(run_dir)
    manager = checkpoints.best if which == "best" else checkpoints.latest
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{run_dir} has no {which} checkpoint")
    import orbax.checkpoint as ocp

    # Restore onto this process's first device whatever device the run was trained on (a
    # checkpoint written on a GPU records cuda shardings that do not exist on a CPU machine).
    from etils import epath

    state_dir = epath.Path(manager.directory).absolute() / str(step) / "state"
    metadata = ocp.StandardCheckpointHandler().metadata(state_dir)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                    metadata.tree)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             meta=ocp.args.JsonRestore()))
    state = restored["state"]
    params = state["ema_params"] if isinstance(state, dict) else state[2]
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else x,
                                    params)
    checkpoints.close()
    return LoadedModel(model, params, cutoff, config, run_dir, dtype)
