"""Charged NaCl clusters (Na9Cl8+ / Na8Cl8+), the bundled default dataset.

  python -m experiments.train --config configs/nacl.py --workdir runs/nacl
  python -m experiments.train --config configs/nacl.py --workdir runs/nacl_sr --config.model.variant=sr
"""

from polarjax.data.bundled import bundled_path

from configs.common import base_config


def get_config():
    c = base_config()
    c.data.train_file = str(bundled_path("nacl_clusters.xyz"))
    c.data.valid_fraction = 0.1
    c.data.test_fraction = 0.1
    c.model.encoder = "nequip"
    c.model.encoder_kwargs.cutoff = 5.29
    c.model.encoder_kwargs.num_channels = 16
    c.model.encoder_kwargs.num_layers = 2
    c.model.encoder_kwargs.avg_num_neighbors = 8.0
    c.model.variant = "les"
    c.model.sigma = 1.0
    c.model.dl = 2.0
    c.train.batch_size = 4
    c.train.num_steps = 3000
    c.train.time_budget_minutes = 10.0
    c.train.eval_every = 100
    c.optim.lr = 5e-3
    c.loss.energy_weight = 100.0
    c.loss.forces_weight = 10.0
    c.loss.final_energy_weight = 1000.0
    return c
