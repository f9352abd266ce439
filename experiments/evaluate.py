"""Evaluate a trained run on a labelled file.

  python -m experiments.evaluate --run RUN --data FILE.xyz --output summary.json [--keys forces=force]

Prints an error table and writes: the JSON summary (--output), predictions as extended XYZ
(<output stem>_predictions.xyz) and parity plots (<output stem>_parity.png). Existing files
are never overwritten unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory of experiments.train")
    parser.add_argument("--data", required=True, help="labelled structures (extended XYZ or any ASE format)")
    parser.add_argument("--output", required=True, help="summary JSON path")
    parser.add_argument("--keys", nargs="*", default=[], help="label key overrides, e.g. forces=force energy=E")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from polarjax.training.dataset import check_species, parse_label_keys, read_frames
    from polarjax.training.evaluation import evaluate, format_table, parity_plots, write_predictions
    from polarjax.training.inference import load_model

    output = Path(args.output)
    outputs = [output, output.with_name(output.stem + "_predictions.xyz"), output.with_name(output.stem + "_parity.png")]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not args.overwrite:
        sys.exit(f"refusing to overwrite {existing}; pass --overwrite or choose another --output")
    try:
        keys = parse_label_keys(args.keys)
    except ValueError as error:
        sys.exit(f"--keys: {error}")
    loaded = load_model(args.run, args.checkpoint)
    frames, report = read_frames(args.data, keys, require=())
    check_species(frames, loaded.spec.species)
    summary, predictions = evaluate(loaded, frames, args.batch_size)
    summary["run"] = str(args.run)
    summary["data"] = str(args.data)
    print(format_table(summary))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2))
    write_predictions(outputs[1], frames, predictions)
    parity_plots(outputs[2], frames, predictions)
    print(f"wrote {outputs[0]}, {outputs[1]}, {outputs[2]}")


if __name__ == "__main__":
    main()
