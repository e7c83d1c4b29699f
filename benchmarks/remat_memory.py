"""What `config.model.remat` buys: the memory of one train step, per remat setting.

For every remat setting, from the same run, with ratios to ``remat="none"``:

- **saved residuals**: the bytes autodiff keeps from the forward pass for the backward pass
  (``jax.ad_checkpoint``'s residual list of the loss function), backend-independent: the
  activation memory a TPU or GPU compile starts from, which ``jax.checkpoint`` policies control;
- **XLA**: the compiled step's buffer assignment on the backend at hand (temporaries, and peak =
  arguments + outputs + temporaries - aliased). On XLA CPU the remat barriers are dropped
  before scheduling, so recomputation is hoisted back into the forward pass and remat buys
  nothing there (the CPU path's memory savings come from ``impl="fused"`` instead).

    python benchmarks/remat_memory.py --model deit_small --batch 32
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_info  # noqa: E402

SETTINGS = ("none", "block", "dots_with_no_batch_dims_saveable", "dots_saveable", "nothing_saveable")


def _loss(model, variables, params, x, labels):
    import jax
    import jax.numpy as jnp

    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))


def step_memory(model_name: str, batch: int, remat: str, impl: str) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint prints

    import halluvit_jax as hv

    model = hv.create_model(model_name, remat=remat, impl=impl)
    size = hv.get_input_config(model_name).input_size
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    loss = lambda params, x, labels: _loss(model, variables, params, x, labels)  # noqa: E731

    # Residuals that are not inputs of the loss (params, images) are activations kept for the
    # backward pass.
    residuals = saved_residuals(loss, variables["params"], x, labels)
    kept = sum(a.size * a.dtype.itemsize for a, why in residuals
               if hasattr(a, "dtype") and "argument" not in why)
    m = jax.jit(jax.grad(loss)).lower(variables["params"], x, labels).compile().memory_analysis()
    mib = 1024.0**2
    return {"residual_mib": kept / mib, "temp_mib": m.temp_size_in_bytes / mib,
            "peak_mib": (m.argument_size_in_bytes + m.output_size_in_bytes
                         + m.temp_size_in_bytes - m.alias_size_in_bytes) / mib}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--impl", default="plain", choices=["auto", "plain", "fused"])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--json", default="", help="also write the results, machine and versions here")
    args = ap.parse_args(argv)
    import jax

    rows = [(s, step_memory(args.model, args.batch, s, args.impl)) for s in args.settings.split(",")]
    base = dict(rows).get("none") or rows[0][1]
    print(f"{args.model}, batch {args.batch}, impl={args.impl}, backend {jax.default_backend()}: "
          "memory of the loss-and-gradient step (MiB)")
    print(f"{'remat':34} {'saved MiB':>9} {'/ none':>6} {'XLA temp':>9} {'XLA peak':>9} {'/ none':>6}")
    for s, m in rows:
        print(f"{s:34} {m['residual_mib']:9.0f} {m['residual_mib'] / base['residual_mib']:6.2f} "
              f"{m['temp_mib']:9.0f} {m['peak_mib']:9.0f} {m['peak_mib'] / base['peak_mib']:6.2f}")
    if args.json:
        run_info.write_json(args.json, {
            **run_info.header("remat_memory", __file__, argv), "backend": jax.default_backend(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "results": [{"remat": s, **m} for s, m in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
