"""Liquid water, 32 H2O (96 atoms, periodic) with the DFT cell polarizability tensor (``alpha``).

Trained on energies and forces only; ``alpha`` is never used in training. The emergent
polarizability of the model is compared with it by ``experiments.response``:

  python -m experiments.train --config configs/water_alpha.py --workdir runs/water_alpha
  python -m experiments.response --run runs/water_alpha --data ../shared/data/water_alpha.xyz \
      --epsilon-inf 1.78 --output runs/water_alpha/response_all.json
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.data.train_file = "../shared/data/water_alpha.xyz"
    c.data.valid_fraction = 0.15
    c.data.test_fraction = 0.15
    c.model.encoder = "nequip"
    c.model.encoder_kwargs.cutoff = 4.5
    c.model.encoder_kwargs.num_channels = 16
    c.model.encoder_kwargs.avg_num_neighbors = 30.0
    c.model.variant = "uQiqiu"
    c.model.anisotropic_alpha = True
    c.model.sigma = 1.0
    c.model.dl = 2.0
    c.train.batch_size = 1
    c.train.eval_batch_size = 2
    c.train.num_steps = 3000
    c.train.eval_every = 200
    c.optim.lr = 3e-3
    return c
