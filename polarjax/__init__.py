"""polarjax: latent polarizable multipoles and Ewald electrostatics for MLIPs in JAX."""

__version__ = "0.1.0"


def load_model(run_dir, which: str = "best"):
    """A trained run's ready energy/properties model (best EMA parameters by default); see
    :func:`polarjax.training.inference.load_model`. Imported lazily (keeps ``import polarjax`` light)."""
    from polarjax.training.inference import load_model as _load_model

    return _load_model(run_dir, which)
