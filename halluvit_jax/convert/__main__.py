"""Command line for checkpoint conversion.

    python -m halluvit_jax.convert timm --model deit_small --input deit_small.pth --output out/deit_small
    python -m halluvit_jax.convert timm --model deit_tiny --img-size 384 --input t.safetensors --output out/t384
    python -m halluvit_jax.convert timm --model pvt_v2_b0 --set 'depths=(1,1,1,1)' --input ... --output ...

Each subcommand is a `(add_arguments, run)` pair in `SUBCOMMANDS`; new ones (e.g. `hal`,
`deploy`) register there. Failures print one line to stderr and exit with status 1; nothing
is written unless the whole conversion succeeded.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

from halluvit_jax.convert.common import ConversionError


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
        help="other model field of the checkpoint's architecture, VALUE a Python literal "
        "(e.g. --set 'depths=(1,1,1,1)'); repeatable",
    )


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}.")
        try:
            out[field.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[field.strip()] = value.strip()  # a bare string, e.g. --set hal_variant=ihh
    return out


def _run_timm(args: argparse.Namespace) -> str:
    from halluvit_jax.convert import (
        from_timm,
        load_state_dict_file,
        resolve_model_name,
        save_variables,
    )
    from halluvit_jax.convert.io import check_output_dir
    from halluvit_jax.models import create_model, get_input_config

    check_output_dir(args.output, args.overwrite)  # fail before the (slow) conversion
    name = resolve_model_name(args.model)
    overrides = _parse_overrides(args.overrides)
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


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], str]]] = {
    "timm": ("convert a timm / original PyTorch checkpoint", _add_timm_arguments, _run_timm),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m halluvit_jax.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        message = args._run(args)
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError, OSError) as err:
        text = " ".join(str(err).split())
        print(f"error: {text}", file=sys.stderr)
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
