"""Train a polarjax model.

  python -m experiments.train --config configs/nacl.py --workdir runs/nacl [--config.train.num_steps=2000]

The run directory receives config.json, run_info.json (versions, dataset fingerprints),
metrics.jsonl, tensorboard/, checkpoints/{latest,best}/ and summary.json. Re-running the same
command resumes from the latest checkpoint; a different config in an existing run directory
is refused unless --overwrite (which moves the old directory aside, it never deletes it).
"""

from __future__ import annotations


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

    from polarjax.training.evaluation import format_table

    summary = train(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite)
    print(f"stopped after {summary['steps']} steps ({summary['stop_reason']}), "
          f"{summary['train_time_s'] / 60:.1f} min, best step {summary['best_step']}, "
          f"{summary['num_compiled_shapes']} compiled batch shapes")
    for split in ("valid", "test"):
        if split in summary:
            print(f"\n{split} set (best EMA parameters):")
            print(format_table(summary[split]))
    print(f"\nsummary: {FLAGS.workdir}/summary.json")


if __name__ == "__main__":
    app.run(main)
