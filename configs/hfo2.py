"""Periodic monoclinic-like HfO2 supercells with DFT Born effective charges (label ``BEC``).

Trained on energies and forces (and stress); Born effective charges are for validation.

  python -m experiments.train --config configs/hfo2.py --workdir runs/hfo2
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.data.train_file = "../shared/data/hfo2_bec.xyz"
    c.data.valid_fraction = 0.15
    c.data.test_fraction = 0.15
    c.data.label_keys.bec = "BEC"
    c.model.encoder = "nequip"
    c.model.encoder_kwargs.cutoff = 5.0
    c.model.encoder_kwargs.num_channels = 16
    c.model.encoder_kwargs.avg_num_neighbors = 40.0
    c.model.variant = "uQiqiu"
    c.model.sigma = 1.0
    c.model.dl = 2.0
    c.train.batch_size = 1
    c.train.eval_batch_size = 2
    c.train.num_steps = 2000
    c.train.eval_every = 100
    c.optim.lr = 3e-3
    c.loss.stress_weight = 1000.0
    c.loss.final_stress_weight = 1000.0
    return c
