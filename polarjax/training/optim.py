"""Optimizers, learning-rate schedules and the parameter EMA (optax).

``build_optimizer(optim_config, num_steps)`` returns an ``optax.GradientTransformation``:

    clip_by_global_norm → adam | adamw | amsgrad (with the schedule) → [reduce_on_plateau]

Schedules: ``constant``, ``cosine`` (linear warmup then cosine decay to ``final_lr_ratio``)
and ``exponential`` (warmup then lr · decay_rate^(step / decay_steps)). Reduce-on-plateau
scales the updates by a factor that drops when the loss passed to ``update(..., value=)``
stops improving (``optax.contrib.reduce_on_plateau``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "amsgrad")
SCHEDULES = ("constant", "cosine", "exponential")


def _get(config: Mapping[str, Any], key: str, default):
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def build_schedule(config: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    """Learning-rate schedule from ``optim`` config keys lr, schedule, warmup_steps, ...."""
    lr = float(_get(config, "lr", 1e-3))
    kind = _get(config, "schedule", "cosine")
    warmup = int(_get(config, "warmup_steps", 0))
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, num_steps - warmup), alpha=float(_get(config, "final_lr_ratio", 0.01)))
    else:
        main = optax.exponential_decay(lr, int(_get(config, "decay_steps", max(1, num_steps // 10))),
                                       float(_get(config, "decay_rate", 0.5)))
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(lr / 100.0, lr, warmup), main], [warmup])


def build_optimizer(config: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
    """The full optimizer chain; see the module docstring for the config keys."""
    name = _get(config, "name", "adam")
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
    schedule = build_schedule(config, num_steps)
    b1, b2 = float(_get(config, "beta1", 0.9)), float(_get(config, "beta2", 0.999))
    weight_decay = float(_get(config, "weight_decay", 0.0))
    if name == "adam":
        core = optax.adam(schedule, b1=b1, b2=b2)
    elif name == "adamw":
        core = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    else:
        core = optax.chain(optax.scale_by_amsgrad(b1=b1, b2=b2), optax.scale_by_learning_rate(schedule))
    chain = []
    clip = float(_get(config, "clip_norm", 0.0))
    if clip > 0:
        chain.append(optax.clip_by_global_norm(clip))
    if name != "adamw" and weight_decay > 0:
        chain.append(optax.add_decayed_weights(weight_decay))
    chain.append(core)
    if bool(_get(config, "reduce_on_plateau", False)):
        chain.append(optax.contrib.reduce_on_plateau(
            factor=float(_get(config, "plateau_factor", 0.5)),
            patience=int(_get(config, "plateau_patience", 100)),
            cooldown=int(_get(config, "plateau_cooldown", 0)),
            accumulation_size=int(_get(config, "plateau_accumulation", 1)),
        ))
    return optax.chain(*chain)


def ema_update(ema_params, params, decay: float, step):
    """Exponential moving average with the usual warm start (decay ramps up with step).

    decay_t = min(decay, (1 + t) / (10 + t)), so early averages are not dominated by the
    random initialisation.
    """
    step = jnp.asarray(step, jnp.float32)
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree_util.tree_map(lambda e, p: rate * e + (1.0 - rate) * p, ema_params, params)
