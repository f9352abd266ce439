"""Liquid water, 32 H2O (96 atoms, periodic) with the DFT cell polarizability tensor (``alpha``).

The water config (NequIP, cutoff 4.5 Å, uQiqiu) on ../shared/data/water_alpha.xyz, with
anisotropic atomic polarizabilities and a 15 % / 15 % valid / test split. Trained on energies
and forces only; ``alpha`` is never used in training. The emergent polarizability of the model
is compared with it by ``experiments.response``:

  python -m experiments.train --config configs/water_alpha.py --workdir runs/water_alpha
  python -m experiments.response --run runs/water_alpha --data ../shared/data/water_alpha.xyz \
      --epsilon-inf 1.78 --output runs/water_alpha/response_all.json
"""

from configs import water


def get_config():
    c = water.get_config()
    c.data.train_file = "../shared/data/water_alpha.xyz"
    c.data.valid_fraction = 0.15
    c.data.test_fraction = 0.15
    c.model.anisotropic_alpha = True
    return c
