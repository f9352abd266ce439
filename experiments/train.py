"""Train a polarjax model.

  python -m experiments.train --config configs/nacl.py --workdir runs/nacl [--config.train.num_steps=2000]

The run directory receives config.json, run_info.json (versions, dataset fingerprints),
metrics.jsonl, tensorboard/, checkpoints/{latest,best}/ and summary.json. Re-running the same
command resumes from the latest checkpoint; a different config in an existing run directory
is refused unless --overwrite (which moves the old directory aside, it never deletes it).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory.")
flags.DEFINE_bool("overwrite", False, "Move an existing, different run directory aside and start fresh.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from polarjax.training.loop import train

    summary = train(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
