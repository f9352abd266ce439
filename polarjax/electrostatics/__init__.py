"""Latent Ewald electrostatics: Gaussian multipoles (q, u, Q) with one-shot linear response.

Public entry point: :func:`ewald`. Pure jit-able cores: :func:`electrostatics`,
:func:`electrostatics_batch`. Conventions: docs/electrostatics.md.
"""

from polarjax.electrostatics.ewald import (
    TERM_NAMES,
    EwaldResult,
    electrostatics,
    electrostatics_batch,
    ewald,
    validate_inputs,
)
from polarjax.electrostatics.kgrid import batch_kgrid_weights, count_kvectors, kgrid_bounds, kgrid_weights, kgrid_weights_jax
from polarjax.electrostatics.sources import self_energy, self_energy_coefficients, traceless_symmetric

__all__ = [
    "TERM_NAMES",
    "EwaldResult",
    "batch_kgrid_weights",
    "count_kvectors",
    "electrostatics",
    "electrostatics_batch",
    "ewald",
    "kgrid_bounds",
    "kgrid_weights",
    "kgrid_weights_jax",
    "self_energy",
    "self_energy_coefficients",
    "traceless_symmetric",
    "validate_inputs",
]
