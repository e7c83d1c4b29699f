"""The Triton kernels of ``impl="pallas"`` compiled for a GPU, offline, on a host without one.

For each hal model: its bfloat16 train step (loss gradient) and deploy forward exported for
``cuda`` with ``impl="pallas"`` (`jax.export`, on this CPU), every ``__gpu$xla.gpu.triton`` call
in the program read back (the kernel's Triton IR, which Pallas serializes into the call), and
each distinct kernel compiled by the ``triton`` package to a cubin for each target (default
sm_80, sm_86 and sm_90: A100, A10 / RTX 30, H100/H200); ``ptxas -v`` reports its registers, spills and shared memory.
A kernel that does not compile, or needs more shared memory than the SM has, is an error: that
is what a GPU would refuse at launch.

    python benchmarks/triton_compile.py --json benchmarks/results/triton_compile.json

XLA compiles these calls with the Triton it bundles, not the ``triton`` wheel used here, so this
checks the IR against one Triton release and one ptxas; it says nothing of speed.
docs/benchmarks.md renders the table from the JSON (benchmarks/render_docs.py). Needs the
``triton`` package (the ``test`` extra installs it on Linux x86-64).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_info  # noqa: E402

# Shared memory one block may use (opt-in maximum), bytes, by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MODELS = ("deit_small_hal", "pvt_v2_b1_hal", "nextvit_small_hal")


def export_for_cuda(fn, *args) -> str:
    """``fn`` exported for CUDA (the Triton calls allowed), as StableHLO text."""
    import jax
    from jax import export

    from halluvit_jax.layers.kernels.hmhsa_triton import CUSTOM_CALL

    checks = [export.DisabledSafetyCheck.custom_call(CUSTOM_CALL)]
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()


def triton_kernels(stablehlo: str) -> list[dict[str, Any]]:
    """Every Triton call of a StableHLO module: its kernel name, launch grid, ``num_warps``,
    ``num_stages`` and Triton IR (as text), in program order."""
    from jax._src.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir
    from jaxlib.triton import dialect as tt_dialect

    from halluvit_jax.layers.kernels.hmhsa_triton import CUSTOM_CALL

    ctx = jax_mlir.make_ir_context()
    tt_ctx = ir.Context()
    tt_ctx.append_dialect_registry(jax_mlir.upstream_dialects)
    tt_dialect.register_dialect(tt_ctx)
    tt_ctx.load_all_available_dialects()
    out: list[dict[str, Any]] = []

    def visit(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    attrs = child.operation.attributes
                    if (child.operation.name == "stablehlo.custom_call"
                            and ir.StringAttr(attrs["call_target_name"]).value == CUSTOM_CALL):
                        cfg = attrs["mhlo.backend_config"]
                        num = lambda key: ir.IntegerAttr(cfg[key]).value  # noqa: E731
                        ttir = ir.Module.parse(cfg["ir"].value_bytes, context=tt_ctx)
                        out.append({"name": ir.StringAttr(cfg["name"]).value,
                                    "grid": [num("grid_x"), num("grid_y"), num("grid_z")],
                                    "num_warps": num("num_warps"), "num_stages": num("num_stages"),
                                    "ttir": ttir.operation.get_asm(enable_debug_info=False)})
                    visit(child.operation)

    visit(ir.Module.parse(stablehlo, context=ctx).operation)
    return out


def compile_kernel(kernel: dict[str, Any], capability: int = 90) -> dict[str, Any]:
    """One kernel of `triton_kernels` compiled to a cubin for ``sm_<capability>``: shared
    memory (bytes), registers per thread and spill bytes (``ptxas -v``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, kernel["name"] + ".ttir")
        with open(src, "w") as f:
            f.write(kernel["ttir"])
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={
            "num_warps": kernel["num_warps"], "num_stages": kernel["num_stages"],
            "enable_fp_fusion": True})  # Triton's long-standing default, explicit since 3.9
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        report = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", ptx,
                                 "-o", ptx + ".o"], capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else 0  # noqa: E731
    return {"shared_bytes": int(compiled.metadata.shared), "registers": number(r"Used (\d+) registers"),
            "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads")}


def model_program(name: str, batch: int):
    """The bf16 ``impl='pallas'`` train step (parameter gradient) and deploy forward of model
    ``name``, and its abstract arguments."""
    import jax
    import jax.numpy as jnp

    from halluvit_jax.models import create_model, deploy_form, get_input_config

    size = get_input_config(name).input_size
    model = create_model(name, impl="pallas", dtype=jnp.bfloat16)
    deploy = deploy_form(model)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    init = lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros(x.shape)))  # noqa: E731
    variables, deploy_vars = init(model), init(deploy)

    def fn(variables, deploy_vars, x):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                    mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
            return jnp.mean(logits.astype(jnp.float32) ** 2)
        return jax.grad(loss)(variables["params"]), deploy.apply(deploy_vars, x)

    return fn, (variables, deploy_vars, x)


def measure(name: str, batch: int, capabilities: list[int]) -> list[dict[str, Any]]:
    """One row per distinct Triton kernel of model ``name``'s program and target."""
    fn, args = model_program(name, batch)
    kernels = triton_kernels(export_for_cuda(fn, *args))
    rows, seen = [], {}
    for kernel in kernels:
        key = (kernel["ttir"], kernel["num_warps"], kernel["num_stages"])
        if key in seen:
            for row in seen[key]:
                row["calls"] += 1
            continue
        seen[key] = []
        for capability in capabilities:
            row = {"model": name, "kernel": kernel["name"], "capability": capability,
                   "grid": kernel["grid"], "num_warps": kernel["num_warps"], "calls": 1,
                   **compile_kernel(kernel, capability)}
            limit = SHARED_LIMIT.get(capability)
            row["fits"] = limit is None or row["shared_bytes"] <= limit
            seen[key].append(row)
            rows.append(row)
            print(f"{name:20s} {row['kernel']:18s} sm_{capability} grid {row['grid']} warps "
                  f"{row['num_warps']}: shared {row['shared_bytes'] / 1024:.0f} KiB, "
                  f"{row['registers']} registers, spills {row['spill_store_bytes']}/"
                  f"{row['spill_load_bytes']} B", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=128, help="images per step (sets the grids)")
    ap.add_argument("--capabilities", default="80,86,90",
                    help="comma-separated compute capabilities (80: A100, 86: A10/RTX 30, "
                         "90: H100/H200)")
    ap.add_argument("--json", default="", help="write the report here")
    args = ap.parse_args(argv)
    head = run_info.header("triton_compile", __file__, argv, extra=("triton",))
    try:
        capabilities = [int(c) for c in args.capabilities.split(",")]
    except ValueError:
        ap.error(f"--capabilities takes integers like 80,90, got {args.capabilities!r}")
    rows = [row for name in args.models.split(",") for row in measure(name, args.batch, capabilities)]
    if args.json:
        run_info.write_json(args.json, {**head, "shared_limit_bytes": {
            str(c): SHARED_LIMIT.get(c) for c in capabilities}, "batch": args.batch, "results": rows})
    too_big = [f"{r['model']}/{r['kernel']} on sm_{r['capability']}" for r in rows if not r["fits"]]
    if too_big:
        print(f"error: {', '.join(too_big)}: more shared memory than the SM has", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
