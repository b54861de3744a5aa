"""Prepare a TensorFlow Datasets build of a re-ID folder dataset (array_record files, random
access without TensorFlow):

    python -m ctl_jax.data.prepare --name=market1501 --manual_dir=data --data_dir=data/tfds

then train with `--config.data.source=tfds --config.data.tfds_data_dir=data/tfds`. The build
holds the original image bytes, so training reads the same pixels as from the folders.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from ctl_jax.errors import DEBUG_HELP, UserError, debug_requested, report_user_error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, choices=("market1501", "dukemtmc", "synthetic"))
    parser.add_argument(
        "--manual_dir",
        required=True,
        help="the folder the config's data.root names (for synthetic: the dataset itself)",
    )
    parser.add_argument("--data_dir", required=True, help="where the build is written")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)

    from ctl_jax.data.tfds_builders import load_tfds, prepare_tfds

    if not pathlib.Path(args.manual_dir).is_dir():
        print(f"error: --manual_dir {args.manual_dir} is not a folder", file=sys.stderr)
        return 2
    try:
        prepare_tfds(args.name, args.manual_dir, args.data_dir)
        dataset, _ = load_tfds(args.name, args.data_dir)
    except UserError as e:
        return report_user_error(e, debug_requested(args.debug))
    print(dataset.statistics_table())
    print(f"prepared {args.name} in {args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
