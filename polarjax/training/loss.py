"""Training losses and error metrics on padded batches.

Per batch (padding graphs/atoms excluded through the masks):

    L = w_E · mean_g ρ((E_g − Ê_g) / n_g) + w_F · mean_{i,α} ρ(F_iα − F̂_iα) + w_S · mean_{g periodic} ρ(σ_g − σ̂_g)

with ρ(x) = x² (MSE) or the Huber function of width ``huber_delta`` (eV/atom, eV/Å, eV/Å³;
the same δ for all terms). Two loss-weight *stages*: (w_E, w_F, w_S) for most of training,
then (final weights) for the last ``final_fraction`` of the steps, e.g. raising the energy
weight late in training as the MACE/NequIP recipes do.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np


class LossWeights(NamedTuple):
    energy: float
    forces: float
    stress: float


def _rho(residual, huber_delta):
    if huber_delta is None or huber_delta <= 0:
        return residual**2
    abs_r = jnp.abs(residual)
    return jnp.where(abs_r <= huber_delta, 0.5 * residual**2, huber_delta * (abs_r - 0.5 * huber_delta)) * 2.0


def _masked_mean(values, mask):
    mask = mask.astype(values.dtype)
    while mask.ndim < values.ndim:
        mask = mask[..., None]
    count = jnp.sum(jnp.broadcast_to(mask, values.shape))
    return jnp.sum(values * mask) / jnp.maximum(count, 1.0), count


def loss_terms(pred: Mapping[str, Any], batch_labels: Mapping[str, Any], graph, huber_delta=None):
    """Per-term loss sums and counts (so that sharded batches can be combined exactly).

    Args:
      pred: model outputs with energy [G], forces [N, 3], stress [G, 3, 3] (optional).
      batch_labels: energy [G], forces [N, 3], stress [G, 3, 3] (optional), and masks
        has_stress [G] (optional).
      graph: the padded Graph (masks, n_atoms, periodic).

    Returns:
      dict name → (sum of ρ over entries, number of entries), names energy/forces/stress.
    """
    n_atoms = jnp.maximum(graph.n_atoms, 1).astype(pred["energy"].dtype)
    energy_residual = (pred["energy"] - batch_labels["energy"]) / n_atoms
    energy_mask = graph.graph_mask
    forces_residual = pred["forces"] - batch_labels["forces"]
    forces_mask = jnp.broadcast_to(graph.node_mask[:, None], forces_residual.shape)
    out = {
        "energy": (jnp.sum(jnp.where(energy_mask, _rho(energy_residual, huber_delta), 0.0)),
                   jnp.sum(energy_mask).astype(energy_residual.dtype)),
        "forces": (jnp.sum(jnp.where(forces_mask, _rho(forces_residual, huber_delta), 0.0)),
                   jnp.sum(forces_mask).astype(forces_residual.dtype)),
    }
    if "stress" in batch_labels and "stress" in pred:
        has = graph.graph_mask & graph.periodic & batch_labels.get("has_stress", graph.periodic)
        residual = pred["stress"] - batch_labels["stress"]
        mask = jnp.broadcast_to(has[:, None, None], residual.shape)
        out["stress"] = (jnp.sum(jnp.where(mask, _rho(residual, huber_delta), 0.0)),
                         jnp.sum(mask).astype(residual.dtype))
    return out


def combine_loss(terms: Mapping[str, Any], weights: LossWeights):
    """Weighted sum of per-term means from ``loss_terms`` (possibly summed over shards)."""
    total = 0.0
    for name, weight in (("energy", weights.energy), ("forces", weights.forces), ("stress", weights.stress)):
        if name in terms:
            value, count = terms[name]
            total = total + weight * value / jnp.maximum(count, 1.0)
    return total


def stages_from_config(loss_config, num_steps: int) -> list[dict]:
    """The two stages from ``loss`` config keys energy_weight, forces_weight, stress_weight,
    final_fraction and final_{energy,forces,stress}_weight (final ones default to the first)."""
    get = lambda key, default: default if loss_config.get(key) is None else float(loss_config.get(key))
    first = dict(start_step=0, energy=get("energy_weight", 1.0), forces=get("forces_weight", 10.0),
                 stress=get("stress_weight", 0.0))
    fraction = get("final_fraction", 0.0)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"loss.final_fraction must be in [0, 1), got {fraction}")
    stages = [first]
    if fraction > 0:
        stages.append(dict(start_step=int(round((1.0 - fraction) * num_steps)),
                           energy=get("final_energy_weight", first["energy"]),
                           forces=get("final_forces_weight", first["forces"]),
                           stress=get("final_stress_weight", first["stress"])))
    return stages


def weights_at_step(stages: Sequence[Mapping[str, Any]], step: int) -> LossWeights:
    """Loss weights of the last stage whose ``start_step`` <= step.

    ``stages`` is a list of dicts with keys start_step, energy, forces, stress; the first
    must start at 0.
    """
    if not stages:
        raise ValueError("loss.stages must contain at least one stage")
    ordered = sorted(stages, key=lambda s: int(s["start_step"]))
    if int(ordered[0]["start_step"]) != 0:
        raise ValueError("the first loss stage must have start_step = 0")
    current = ordered[0]
    for stage in ordered:
        if int(stage["start_step"]) <= step:
            current = stage
    return LossWeights(float(current["energy"]), float(current["forces"]), float(current.get("stress", 0.0)))


class ErrorAccumulator:
    """Host-side RMSE/MAE accumulator of energies per atom, forces and stresses over batches."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, name: str, residuals: np.ndarray):
        residuals = np.asarray(residuals, dtype=np.float64).ravel()
        entry = self.sums.setdefault(name, [0.0, 0.0, 0])
        entry[0] += float(np.sum(residuals**2))
        entry[1] += float(np.sum(np.abs(residuals)))
        entry[2] += residuals.size

    def result(self) -> dict[str, float]:
        out = {}
        for name, (sq, ab, n) in self.sums.items():
            if n:
                out[f"{name}_rmse"] = float(np.sqrt(sq / n))
                out[f"{name}_mae"] = float(ab / n)
                out[f"{name}_count"] = n
        return out
