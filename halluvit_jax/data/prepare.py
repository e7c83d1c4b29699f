"""TF-free dataset preparation CLI.

    python -m halluvit_jax.data.prepare imagenet2012 --manual_dir DIR --data_dir DIR
    python -m halluvit_jax.data.prepare imagenet2012_real --manual_dir DIR --data_dir DIR
    python -m halluvit_jax.data.prepare imagenet_v2/matched-frequency --manual_dir DIR --data_dir DIR
    python -m halluvit_jax.data.prepare cifar100 --manual_dir DIR --data_dir DIR
    python -m halluvit_jax.data.prepare stanford_dogs --manual_dir DIR --data_dir DIR
    python -m halluvit_jax.data.prepare demo --data_dir DIR

Writes TFDS ArrayRecord datasets (readable with ``tfds.data_source`` / our pipeline). Re-running
a finished preparation is a no-op; an interrupted one never leaves a dataset that looks complete
(TFDS writes into ``incomplete.*`` and renames on success; leftovers are removed on the next run).
"""

from __future__ import annotations

import logging
import os
import sys

from halluvit_jax.cli import ArgumentParser, UsageError, run_main
from halluvit_jax.data import cifar, demo, imagenet, registry, stanford_dogs, tfds_utils
from halluvit_jax.data.tfds_utils import ManualDirError

logger = logging.getLogger("halluvit_jax.data")

_NEEDS_MANUAL = ("imagenet2012", "imagenet2012_real", "imagenet_v2", "cifar100", "stanford_dogs")
#: Cheap checks of a manual dir, run before TFDS creates anything.
_VALIDATE = {
    "imagenet2012": imagenet.validate_manual_dir,
    "cifar100": cifar.check_manual_dir,
    "stanford_dogs": stanford_dogs.validate_manual_dir,
}


def prepare_dataset(name: str, data_dir: str | os.PathLike,
                    manual_dir: str | os.PathLike | None = None,
                    validation_labels_file: str | None = None) -> dict:
    """Prepares dataset ``name`` ('demo' is an alias of the digits demo) into ``data_dir``.

    Returns a summary ``{'name', 'prepared' (False: already there), 'splits': {split: n},
    'skipped': [corrupt file names], 'missing': [listed files absent from the archive],
    'reencoded': {reason: count}}``.
    """
    if name in ("demo", demo.DEMO_DATASET):
        name = demo.DEMO_DATASET
    base = name.split("/")[0]
    if base in _NEEDS_MANUAL and manual_dir is None:
        raise ManualDirError(f"{name} needs --manual_dir (see docs/data.md)")
    if base in _VALIDATE:
        _VALIDATE[base](manual_dir)
    builder = registry.get_builder(name, data_dir)
    if validation_labels_file is not None:
        builder.validation_labels_file = os.fspath(validation_labels_file)
    generated = tfds_utils.prepare_builder(builder, manual_dir=manual_dir)
    skipped = list(getattr(builder, "skipped", []))
    missing = list(getattr(builder, "missing", []))
    if skipped:
        logger.warning("%s: skipped %d corrupt image(s): %s", name, len(skipped),
                       ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""))
    return {
        "name": name,
        "prepared": generated,
        "splits": {k: int(v.num_examples) for k, v in builder.info.splits.items()},
        "skipped": skipped,
        "missing": missing,
        "reencoded": dict(getattr(builder, "fixed", {})),
    }


def _main(argv) -> int:
    ap = ArgumentParser(prog="python -m halluvit_jax.data.prepare",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="imagenet2012 | imagenet2012_real | "
                    "imagenet_v2/<matched-frequency|threshold-0.7|topimages> | cifar100 | "
                    "stanford_dogs | demo")
    ap.add_argument("--data_dir", required=True, help="TFDS data dir to write into")
    ap.add_argument("--manual_dir", default=None,
                    help="directory with the manually downloaded archives (ImageNet, "
                    "cifar-100-python.tar.gz, Stanford Dogs images.tar + lists.tar)")
    ap.add_argument("--validation_labels", default=None,
                    help="optional override of TFDS's validation_labels.txt (imagenet2012)")
    ap.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = prepare_dataset(args.dataset, args.data_dir, args.manual_dir,
                                  args.validation_labels)
    except (ManualDirError, FileNotFoundError) as e:  # a bad --manual_dir / --validation_labels
        raise UsageError(str(e)) from None
    state = "prepared" if summary["prepared"] else "already prepared (nothing to do)"
    print(f"{summary['name']}: {state} in {args.data_dir}; splits {summary['splits']}; "
          f"skipped {len(summary['skipped'])} corrupt; re-encoded {summary['reencoded']}"
          + (f"; {len(summary['missing'])} listed but missing" if summary["missing"] else ""))
    return 0


def main(argv=None) -> int:
    """Exit 0, or 2 with one ``error:`` line (bad dataset name / manual dir); ``--debug``: traceback."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
