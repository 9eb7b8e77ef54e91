"""Command line: prepare datasets and summarise what is prepared.

python -m unimmad_jax.data prepare --dataset NAME [--manual-dir DIR] --data-dir OUT
python -m unimmad_jax.data prepare --dataset folder --name NAME --manual-dir DIR --data-dir OUT   (your own data)
python -m unimmad_jax.data summary --data-dir OUT [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from unimmad_jax.data.builders import BUILDERS, prepare
from unimmad_jax.data.prepared import format_sample_counts, sample_counts
from unimmad_jax.data.schema import InvalidDataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unimmad_jax.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="build a dataset into array_record files once")
    prepare_parser.add_argument(
        "--dataset",
        required=True,
        help=f"one of {', '.join(sorted(BUILDERS))}; mmad_meta and folder as mmad_meta/<dataset>, folder/<name>",
    )
    prepare_parser.add_argument(
        "--name", help="with --dataset folder or mmad_meta: the dataset's name (the same as --dataset folder/<name>)"
    )
    prepare_parser.add_argument("--manual-dir", help="the downloaded dataset folder (not for the built-in ones)")
    prepare_parser.add_argument("--data-dir", required=True, help="where prepared datasets live")
    summary_parser = commands.add_parser("summary", help="samples per dataset, split and class")
    summary_parser.add_argument("--data-dir", required=True)
    summary_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            dataset = f"{args.dataset}/{args.name}" if args.name else args.dataset
            folder = prepare(dataset, args.data_dir, args.manual_dir)
            print(f"Prepared {dataset} in {folder}")
        elif args.json:
            print(json.dumps(sample_counts(args.data_dir), indent=2))
        else:
            print(format_sample_counts(sample_counts(args.data_dir)))
    except InvalidDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
