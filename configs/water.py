"""Liquid water, RPBE-D3 (64 H2O, 192 atoms, periodic), ../shared/data/water_rpbe_d3.xyz.

  python -m experiments.train --config configs/water.py --workdir runs/water \
      --config.data.train_file=/path/to/water_rpbe_d3.xyz
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.data.train_file = "../shared/data/water_rpbe_d3.xyz"
    c.data.valid_fraction = 0.1
    c.data.test_fraction = 0.1
    c.model.encoder = "nequip"
    c.model.encoder_kwargs.cutoff = 4.5
    c.model.encoder_kwargs.num_channels = 16
    c.model.encoder_kwargs.avg_num_neighbors = 30.0
    c.model.variant = "uQiqiu"
    c.model.sigma = 1.0
    c.model.dl = 2.0
    c.train.batch_size = 1
    c.train.eval_batch_size = 2
    c.train.num_steps = 3000
    c.train.eval_every = 200
    c.optim.lr = 3e-3
    return c
