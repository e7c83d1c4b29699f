r"""Analysis CLI: head redundancy (CCS) and attention-map figures of a checkpoint.

  python -m halluvit_jax.analysis ccs --checkpoint runs/demo --data demo [--json ccs.json]
  python -m halluvit_jax.analysis ccs --checkpoint converted/deit_s_hal \
      --data tfds:imagenet2012:validation[:1000] --data-dir ~/tensorflow_datasets
  python -m halluvit_jax.analysis attention --checkpoint runs/demo --image digit.png \
      --block 1 --query 0 --out maps.png [--similarity-out sim.png]

``--checkpoint``: a training workdir (architecture from its config.json) or a converted
directory (model_card.json); ``--model NAME`` / ``--set FIELD=VALUE`` override the architecture.
``--data``: ``demo`` (embedded digits, validation split), a directory of images, or
``tfds:NAME[:SPLIT]`` with ``--data-dir``. Attention maps are read from the 'attn' maps the
attention layers sow into 'intermediates'; hMHSA heads are real first, then hallucinated.
For ``attention``, ``--image demo:I`` takes validation digit I of the demo.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from halluvit_jax.analysis.ccs import (
    CCSAccumulator,
    attention_maps,
    hal_heads,
    is_hal_model,
    model_ccs,
)
from halluvit_jax.analysis.figures import attention_grid_figure, similarity_figure
from halluvit_jax.analysis.images import demo_images, iter_batches, preprocess_file
from halluvit_jax.cli import ArgumentParser, UsageError, parse_set, run_main
from halluvit_jax.loading import load
from halluvit_jax.data import transforms


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="training workdir or converted checkpoint dir")
    p.add_argument("--model", default=None, help="registered model name (default: from the checkpoint)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="model field override (repeatable; VALUE as cli.parse_set reads it), e.g. --set depth=4")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--step", type=int, default=None, help="training checkpoint step (default: latest)")


def _load(args):
    return load(args.checkpoint, ema=args.ema, step=args.step, model=args.model, overrides=parse_set(args.overrides))


def cmd_ccs(args) -> str:
    """CCS per block and overall."""
    loaded = _load(args)
    batches = iter_batches(args.data, loaded, batch_size=args.batch_size, data_dir=args.data_dir,
                           max_images=args.max_images)
    res = model_ccs(loaded.model, loaded.variables, batches, max_images=args.max_images)
    out = {"model": loaded.name, "hal": is_hal_model(loaded.model), "checkpoint": loaded.source,
           "data": args.data, "num_images": res["num_images"], "ccs": res["ccs"],
           "blocks": [{"block": b["block"], "heads": b["heads"], "score": b["score"]} for b in res["blocks"]]}
    if args.similarity:
        for b, full in zip(out["blocks"], res["blocks"]):
            b["similarity"] = full["similarity"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    lines = [f"{loaded.name} ({'hMHSA' if out['hal'] else 'MHSA'}), {res['num_images']} images of {args.data}:"]
    width = max(len(b["block"]) for b in out["blocks"])
    for b in out["blocks"]:
        lines.append(f"  {b['block']:<{width}}  heads {b['heads']:>2}  score {b['score']:.4f}")
    lines.append(f"CCS {res['ccs']:.4f}")
    return "\n".join(lines)


def _image(args, loaded):
    """(normalized [1,S,S,3], uint8 crop) of --image."""
    if args.image.startswith("demo:"):
        imgs = demo_images()
        i = int(args.image.split(":", 1)[1])
        if not 0 <= i < len(imgs):
            raise UsageError(f"--image demo:{i} is out of range; the demo has {len(imgs)} validation digits")
        crop = imgs[i]
        if crop.shape[0] != loaded.input.image_size:
            crop = transforms.resize(crop, loaded.input.image_size)
        x = (crop.astype(np.float32) / 255.0 - np.asarray(loaded.input.mean, np.float32)) / np.asarray(loaded.input.std, np.float32)
    else:
        x, crop = preprocess_file(args.image, loaded)
    return x[None].astype(np.float32), crop


def cmd_attention(args) -> str:
    """Grid of every head's map for one query token, plus per-block head-similarity heatmaps."""
    loaded = _load(args)
    x, crop = _image(args, loaded)
    blocks = attention_maps(loaded.model, loaded.variables, x)
    if not 0 <= args.block < len(blocks):
        raise UsageError(f"--block {args.block} is out of range: the model has {len(blocks)} attention "
                         f"blocks (0..{len(blocks) - 1})")
    name, maps = blocks[args.block]
    hal = is_hal_model(loaded.model)
    labels = hal_heads(maps.shape[1], hal)
    kind = "hMHSA: real heads, then hallucinated (blue)" if hal else "MHSA"
    attention_grid_figure(crop, maps[0], args.query, labels=labels, out=args.out, dpi=args.dpi,
                          title=f"{loaded.name} {name}, query {args.query} ({kind})")
    msg = [f"wrote {args.out} ({name}, {maps.shape[1]} heads, query {args.query})"]
    if args.similarity_out:
        acc = CCSAccumulator()
        acc.update(blocks)
        res = acc.result()
        similarity_figure(res["blocks"], labels=labels, out=args.similarity_out, dpi=args.dpi,
                          title=f"{loaded.name}: head similarity on this image (CCS {res['ccs']:.3f})")
        msg.append(f"wrote {args.similarity_out} ({len(blocks)} blocks, CCS {res['ccs']:.3f} on this image)")
    return "\n".join(msg)


SUBCOMMANDS = {"ccs": cmd_ccs, "attention": cmd_attention}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m halluvit_jax.analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("ccs", help=cmd_ccs.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(c)
    c.add_argument("--data", default="demo", help="demo | DIR of images | tfds:NAME[:SPLIT]")
    c.add_argument("--data-dir", default=None, help="TFDS data_dir for --data tfds:...")
    c.add_argument("--max-images", type=int, default=None, help="use at most this many images")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--json", default=None, help="also write the results to this JSON file")
    c.add_argument("--similarity", action="store_true", help="include the [h, h] matrices in the JSON")
    a = sub.add_parser("attention", help=cmd_attention.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(a)
    a.add_argument("--image", required=True, help="image file, or demo:I for validation digit I")
    a.add_argument("--block", type=int, default=0, help="attention block index (0-based, in model order)")
    a.add_argument("--query", type=int, default=0, help="query token index (0 = class token for DeiT)")
    a.add_argument("--out", required=True, help="output PNG of the per-head maps")
    a.add_argument("--similarity-out", default=None, help="also write per-block head-similarity heatmaps")
    a.add_argument("--dpi", type=int, default=100)
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    print(SUBCOMMANDS[args.command](args))
    return 0


def main(argv=None) -> int:
    """Exit 0, 1 (one ``error:`` line: checkpoint problems), 2 (usage); ``--debug`` for tracebacks."""
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
