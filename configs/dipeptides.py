"""Dipeptides (SPICE, ωB97M-D3(BJ)) with DFT dipoles/quadrupoles/charges for validation only.

Trained on energies and forces; the latent multipoles are compared with the DFT ones by
``experiments.evaluate`` (dipole_rmse_eA, traceless quadrupole R²).

  python -m experiments.train --config configs/dipeptides.py --workdir runs/dipep_uQiqiu
  python -m experiments.evaluate --run runs/dipep_uQiqiu --data ../shared/data/dipeptides_multipoles_val.xyz \
      --keys forces=force --output runs/dipep_uQiqiu/eval/val.json
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.data.train_file = "../shared/data/dipeptides_multipoles_train.xyz"
    c.data.valid_file = "../shared/data/dipeptides_multipoles_val.xyz"
    c.data.label_keys.forces = "force"
    c.model.encoder = "nequip"
    c.model.encoder_kwargs.cutoff = 5.0
    c.model.encoder_kwargs.num_channels = 16
    c.model.encoder_kwargs.avg_num_neighbors = 20.0
    c.model.variant = "uQiqiu"
    c.model.sigma = 1.0
    c.model.dl = 2.0
    c.train.batch_size = 4
    c.train.num_steps = 3000
    c.train.eval_every = 200
    c.optim.lr = 3e-3
    return c
