"""Short-range equivariant encoders, all behind one interface.

Every encoder is a ``flax.linen.Module`` with fields ``num_species``, ``cutoff`` (Å),
``num_channels``, ``l_max``, ``num_layers``, ``num_radial_basis`` (plus its own extras)
and the call

    energy, features = encoder.apply(params, vectors, species, senders, receivers, node_mask, edge_mask)

* ``vectors`` [E, 3]: edge vectors receiver − sender (+ image shift), zero on padded edges;
* ``species`` [N] int32; ``senders`` / ``receivers`` [E] int32; ``node_mask`` [N], ``edge_mask`` [E] bool;
* ``energy`` [N]: per-atom short-range energy, zero on padded atoms;
* ``features``: ``e3nn.IrrepsArray`` [N, C x (0e + 1o + 2e)], zero on padded atoms.

Messages flow sender → receiver (the receiver is the central atom).
"""

from __future__ import annotations

from typing import Any, Dict

import flax.linen as nn

from polarjax.encoders.allegro import Allegro
from polarjax.encoders.cace import CACE
from polarjax.encoders.mace import MACE
from polarjax.encoders.nequip import NequIP

ENCODERS: Dict[str, Any] = {
    "nequip": NequIP,
    "mace": MACE,
    "allegro": Allegro,
    "cace": CACE,
}


def build_encoder(name: str, **kwargs) -> nn.Module:
    """Instantiate the encoder registered as ``name`` in :data:`ENCODERS` with ``kwargs``."""
    try:
        cls = ENCODERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}") from None
    return cls(**kwargs)


__all__ = ["ENCODERS", "build_encoder", "NequIP", "MACE", "Allegro", "CACE"]
