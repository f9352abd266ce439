"""The training state pytree and the jitted (optionally data-parallel) train/eval steps."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from polarjax.training.loss import LossWeights, combine_loss, loss_terms
from polarjax.training.optim import ema_update


class TrainState(NamedTuple):
    """Everything needed to resume training exactly.

    params, opt_state, ema_params: pytrees. step: [] int. rng: PRNG key data [2] uint32.
    epoch, batch_in_epoch: [] int, the position in the deterministic data order.
    """

    params: Any
    opt_state: Any
    ema_params: Any
    step: jnp.ndarray
    rng: jnp.ndarray
    epoch: jnp.ndarray
    batch_in_epoch: jnp.ndarray


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D device mesh over the batch axis (all local devices by default)."""
    devices = jax.devices() if num_devices is None else jax.devices()[:num_devices]
    return Mesh(np.asarray(devices), ("batch",))


def _sharded_terms(model, params, shards, labels, boundary, huber_delta, use_stress):
    """Loss terms summed over the leading shard axis (vmap; each shard a padded batch)."""

    def one(graph, label):
        pred = model.properties(params, graph, boundary=boundary, stress=use_stress, include_e0=False)
        return loss_terms(pred, label, graph, huber_delta)

    per_shard = jax.vmap(one)(shards, labels)
    return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), per_shard)


def make_train_step(model, optimizer: optax.GradientTransformation, boundary: str, huber_delta, use_stress: bool,
                    ema_decay: float, mesh: Mesh | None = None):
    """Jitted step(state, shards, labels, weights[3]) → (state, metrics).

    ``shards``/``labels`` carry a leading axis D (one padded sub-batch per device); the loss
    is computed from the summed per-term errors and counts, so it equals the loss of the
    union batch regardless of D and of how many devices share it.
    """

    def step(state: TrainState, shards, labels, weights):
        loss_weights = LossWeights(weights[0], weights[1], weights[2])

        def loss_fn(params):
            terms = _sharded_terms(model, params, shards, labels, boundary, huber_delta, use_stress)
            return combine_loss(terms, loss_weights), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, value=loss)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay, state.step)
        metrics = {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads)}
        for name, (value, count) in terms.items():
            metrics[f"{name}_mse"] = value / jnp.maximum(count, 1.0)
        new_state = state._replace(params=params, opt_state=opt_state, ema_params=ema, step=state.step + 1,
                                   batch_in_epoch=state.batch_in_epoch + 1)
        return new_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    replicated = NamedSharding(mesh, PartitionSpec())
    batched = NamedSharding(mesh, PartitionSpec("batch"))
    return jax.jit(step, in_shardings=(replicated, batched, batched, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_predict(model, boundary: str, use_stress: bool):
    """Jitted predict(params, graph) → properties; ``energy`` excludes E0 (add it on the host)."""

    def predict(params, graph):
        return model.properties(params, graph, boundary=boundary, stress=use_stress, include_e0=False)

    return jax.jit(predict)
