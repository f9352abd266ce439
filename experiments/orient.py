"""Fix the global sign of a run's latent multipoles (writes RUN/orientation.json).

Energies and forces cannot fix it (see polarjax.training.orientation); training runs this
at the end already. Use this for runs trained before that, or for another convention:

  python -m experiments.orient --run RUN                      # most electronegative element negative
  python -m experiments.orient --run RUN --reference O=-1 --data frames.xyz --overwrite
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory of experiments.train")
    parser.add_argument("--data", default=None, help="structures to measure the charges on (default: the run's training file)")
    parser.add_argument("--reference", default=None, help="ELEMENT=SIGN, e.g. O=-1 (default: most electronegative element negative)")
    parser.add_argument("--max-frames", type=int, default=64)
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing orientation.json")
    args = parser.parse_args(argv)

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from polarjax.training.dataset import check_species, read_frames
    from polarjax.training.inference import load_model
    from polarjax.training.orientation import ORIENTATION_FILE, orientation, oriented, write_orientation

    run = Path(args.run)
    if (run / ORIENTATION_FILE).exists() and not args.overwrite:
        sys.exit(f"{run / ORIENTATION_FILE} exists ({(run / ORIENTATION_FILE).read_text().strip()}); "
                 "pass --overwrite to decide again")
    loaded = load_model(run, args.checkpoint)
    loaded = oriented(loaded, 1.0)  # decide from the raw network sign
    data = args.data or loaded.config["data"]["train_file"]
    if not data or not Path(data).exists():
        sys.exit(f"training file {data!r} of {run} not found; pass --data")
    frames, _ = read_frames(data, {}, require=())
    frames = frames[: args.max_frames]
    check_species(frames, loaded.spec.species)
    result = orientation(loaded, frames, args.reference)
    result["data"] = str(data)
    path = write_orientation(run, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
