"""Command line for checkpoint conversion.

    python -m halluvit_jax.convert timm --model deit_small --input deit_small.pth --output out/deit_small
    python -m halluvit_jax.convert timm --model deit_tiny --img-size 384 --input t.safetensors --output out/t384
    python -m halluvit_jax.convert timm --model pvt_v2_b0 --set 'depths=(1,1,1,1)' --input ... --output ...
    python -m halluvit_jax.convert hal --from converted/deit_small --model deit_small_hal --output out/deit_s_hal
    python -m halluvit_jax.convert deploy --checkpoint runs/deit_s_hal --output exported/deit_s_hal

Each subcommand is a `(add_arguments, run)` pair in `SUBCOMMANDS`; new ones (e.g. `hal`,
`deploy`) register there. Failures print one line to stderr and exit with status 1 (2 for a bad
command line; ``--debug`` shows tracebacks); nothing is written unless the whole conversion succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

from halluvit_jax import loading
from halluvit_jax.cli import ArgumentParser, parse_set, run_main
from halluvit_jax.convert import from_timm, load_state_dict_file, resolve_model_name, save_variables
from halluvit_jax.convert.state_dict import ConversionError
from halluvit_jax.convert.deploy import card_fields, export_deploy
from halluvit_jax.convert.export import write_optimized
from halluvit_jax.convert.hal import (
    calibration_images_from_config,
    conversion_report,
    convert_baseline_to_hal,
    hal_overrides_from_baseline,
    synthetic_calibration_images,
)
from halluvit_jax.checkpoint.io import check_output_dir
from halluvit_jax.models import create_model, get_input_config


def _add_timm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name (deit_small) or timm name")
    p.add_argument("--input", required=True, help=".pth/.pt/.bin (needs torch) or .safetensors")
    p.add_argument("--output", required=True, help="output directory (must be absent or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size of the checkpoint")
    p.add_argument(
        "--img-size", type=int, default=None,
        help="DeiT: build the model at this resolution, resampling the position embedding",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
        help="other model field of the checkpoint's architecture, VALUE as cli.parse_set reads it "
        "(e.g. --set 'depths=(1,1,1,1)'); repeatable",
    )


def _run_timm(args: argparse.Namespace) -> str:
    check_output_dir(args.output, args.overwrite)  # fail before the (slow) conversion
    name = resolve_model_name(args.model)
    overrides = parse_set(args.overrides)
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    try:
        model = create_model(name, **overrides)
    except TypeError as err:
        raise ValueError(f"Bad model override for {name}: {err}.") from None
    variables = from_timm(load_state_dict_file(args.input), name, **overrides)
    input_config = dataclasses.asdict(get_input_config(name))
    input_config["input_size"] = getattr(model, "img_size", None) or input_config["input_size"]
    if args.num_classes is not None:
        input_config["num_classes"] = args.num_classes
    card = {
        "model": name,
        "overrides": overrides,
        "source": {"format": "timm", "file": os.path.basename(args.input)},
        "input": input_config,
    }
    out = save_variables(args.output, variables, card, overwrite=args.overwrite)
    return f"wrote {name} variables to {out}"


def _add_hal_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", required=True, dest="source",
                   help="baseline checkpoint: a converted dir (model_card.json) or a training workdir")
    p.add_argument("--model", required=True, help="hal model to build, e.g. deit_small_hal")
    p.add_argument("--output", required=True, help="output directory (must be absent or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--calib-config", default=None, metavar="CONFIG[:ARGS]",
                   help="training config whose data give the calibration images (default: "
                   "standard-normal images)")
    p.add_argument("--calib-images", type=int, default=64, help="number of calibration images")
    p.add_argument("--calib-split", default="train", help="split the calibration images come from")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--step", type=int, default=None, help="training checkpoint step (default: latest)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cFFN branch noise")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
        help="hal model field (default: the baseline's overrides); repeatable",
    )


def _run_hal(args: argparse.Namespace) -> str:
    check_output_dir(args.output, args.overwrite)
    hal_name = args.model
    get_input_config(hal_name)  # unknown name -> the registry's error
    if not hal_name.endswith("_hal"):
        raise ConversionError(f"--model must be a hal model (e.g. deit_small_hal), got {hal_name!r}.")
    loaded = loading.load(args.source, ema=args.ema, step=args.step)
    base_name = hal_name[: -len("_hal")]
    if loaded.name != base_name:
        raise ConversionError(
            f"{args.source} holds a {loaded.name} checkpoint but {hal_name} converts from {base_name}; "
            f"pass a {base_name} checkpoint or --model {loaded.name}_hal."
        )
    base_overrides, inp, source = card_fields(loaded)
    hal_overrides = hal_overrides_from_baseline(base_overrides)
    hal_overrides.update(parse_set(args.overrides))
    try:
        model = create_model(base_name, **base_overrides)
    except TypeError as err:
        raise ConversionError(f"Checkpoint overrides do not fit {base_name}: {err}.") from None
    size = int(getattr(model, "img_size", None) or inp.get("input_size") or 224)
    if args.calib_config:
        images = calibration_images_from_config(args.calib_config, args.calib_images, args.calib_split)
        calib = {"config": args.calib_config, "split": args.calib_split, "images": len(images)}
    else:
        images = synthetic_calibration_images(size, args.calib_images, args.seed)
        calib = {"synthetic": "standard normal", "images": len(images)}
    variables, plans = convert_baseline_to_hal(
        loaded.variables, base_name, hal_name, images, baseline_overrides=base_overrides,
        hal_overrides=hal_overrides, seed=args.seed,
    )
    report = conversion_report(loaded.variables, base_name, variables, hal_name, images,
                               baseline_overrides=base_overrides, hal_overrides=hal_overrides)
    card = {
        "model": hal_name,
        "overrides": hal_overrides,
        "source": {"format": "baseline", "baseline": base_name, **source},
        "input": {**inp, "input_size": size},
        "calibration": calib,
        "report": report,
        "heads": [{"path": p.path, "kept": p.kept, "slots": p.slots,
                   "chh_r2": [round(r, 4) for r in p.chh_r2]} for p in plans],
    }
    out = save_variables(args.output, variables, card, overwrite=args.overwrite)
    conv, rand = report["converted"], report["random_init"]
    return (
        f"wrote {hal_name} variables to {out}; logits vs {base_name} on {report['images']} images: "
        f"cosine {conv['cosine']:.4f}, top-1 agreement {conv['top1_agreement']:.3f} "
        f"(random init: {rand['cosine']:.4f}, {rand['top1_agreement']:.3f})"
    )


def _add_deploy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="training workdir / checkpoints dir / step dir, or a converted dir")
    p.add_argument("--output", required=True, help="output directory (must be absent or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--step", type=int, default=None, help="training checkpoint step (default: latest)")
    p.add_argument("--model", default=None, help="expected model (default: the checkpoint's)")
    p.add_argument("--format", action="append", default=None, dest="formats", metavar="FORMAT",
                   help="also write stablehlo (model.jaxexport) and/or onnx (model.onnx); "
                   "orbax + safetensors are always written; repeatable or comma-separated")
    p.add_argument("--optimize", action="store_true",
                   help="with --format onnx, also write model.optimized.onnx: onnxruntime's transformer "
                   "optimizer (SkipLayerNormalization, ...) run on model.onnx, checked against it")


def _run_deploy(args: argparse.Namespace) -> str:
    card = export_deploy(args.checkpoint, args.output, use_ema=args.ema, step=args.step,
                         overwrite=args.overwrite, model=args.model,
                         formats=args.formats or ("orbax",))
    cx = card["complexity"]
    optimized = ""
    if args.optimize:
        opt = write_optimized(args.output)  # next to model.onnx; the card lists the checked files
        optimized = (f"; {opt['file']} (max relative logit error vs model.onnx "
                     f"{opt['max_rel_logit_error_vs_onnx']:.1e})")
    return (
        f"wrote deploy-form {card['model']} to {os.path.abspath(args.output)} "
        f"({cx['params'] / 1e6:.3f}M params, {cx['macs'] / 1e6:.1f}M MACs at {cx['resolution']}px; "
        f"max relative logit error vs training form {card['check']['max_rel_logit_error_vs_training_form']:.1e})"
        + "".join(f"; {card['files'][f]} (max relative logit error vs JAX "
                  f"{card['check'][f'max_rel_logit_error_{f}_vs_jax']:.1e})"
                  for f in ("stablehlo", "onnx") if f in card["files"])
        + optimized
    )


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], str]]] = {
    "timm": ("convert a timm / original PyTorch checkpoint", _add_timm_arguments, _run_timm),
    "hal": ("initialize a hal model from a pretrained baseline", _add_hal_arguments, _run_hal),
    "deploy": ("fold a trained model into its deploy form and export it", _add_deploy_arguments, _run_deploy),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m halluvit_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    print(args._run(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit 0, 1 (one ``error:`` line; nothing written) or 2 (usage); ``--debug`` for tracebacks."""
    return run_main(_run, argv, user_errors=(ConversionError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
