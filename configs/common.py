"""Shared defaults for the shipped configs (ml_collections ConfigDicts)."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Defaults every config starts from; each dataset config overrides what it needs."""
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.train_file = ""
    c.data.valid_file = ""
    c.data.test_file = ""
    c.data.valid_fraction = 0.1
    c.data.test_fraction = 0.1
    c.data.split_seed = 0
    c.data.max_train_frames = 0          # 0 = all
    c.data.skip_invalid = False          # explicit: skip (and report) invalid frames
    c.data.label_keys = ml_collections.ConfigDict(dict(energy="energy", forces="forces", stress="stress", bec="bec"))

    c.model = ml_collections.ConfigDict()
    c.model.encoder = "nequip"
    c.model.encoder_kwargs = ml_collections.ConfigDict(dict(
        cutoff=5.0, num_channels=16, l_max=2, num_layers=2, num_radial_basis=8, avg_num_neighbors=10.0))
    c.model.variant = "les"
    c.model.anisotropic_alpha = False
    c.model.sigma = 1.0
    c.model.dl = 2.0
    c.model.remove_self_interaction = True
    c.model.species = ml_collections.FieldReference(None, field_type=list)       # None → from the training data
    c.model.atomic_energies = ml_collections.FieldReference(None, field_type=list)  # None → least-squares fit

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"
    c.optim.lr = 5e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 50
    c.optim.final_lr_ratio = 0.02
    c.optim.decay_steps = 1000
    c.optim.decay_rate = 0.5
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 10.0
    c.optim.reduce_on_plateau = False
    c.optim.plateau_factor = 0.5
    c.optim.plateau_patience = 200
    c.optim.ema_decay = 0.99

    c.loss = ml_collections.ConfigDict()
    c.loss.huber_delta = ml_collections.FieldReference(None, field_type=float)
    # Energy per atom (eV) and force (eV/Å) errors differ by ~10x in size: weight both so they
    # matter. For the last `final_fraction` of the steps the final weights apply (energy raised
    # late in training, as in the MACE/NequIP recipes).
    c.loss.energy_weight = 100.0
    c.loss.forces_weight = 10.0
    c.loss.stress_weight = 0.0
    c.loss.final_fraction = 0.2
    c.loss.final_energy_weight = 1000.0
    c.loss.final_forces_weight = 10.0
    c.loss.final_stress_weight = 0.0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.time_budget_minutes = 0.0    # 0 = no budget
    c.train.batch_size = 4
    c.train.eval_batch_size = 16
    c.train.eval_every = 100
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.early_stopping_patience = 0  # in evaluations; 0 = off
    c.train.seed = 0
    c.train.float64 = False
    c.train.num_devices = 0              # 0 = all local devices
    c.train.tensorboard = True
    c.train.orientation_reference = ""  # sign convention of the latent multipoles, e.g. "O=-1";
                                        # "" = the most electronegative species is negative

    return c
