"""Accelerator lowering without an accelerator: `jax.export` for ``tpu`` and ``cuda``.

With the default ``impl="auto"`` each layer picks its path with `lax.platform_dependent`: the
CPU kernels of `halluvit_jax.layers.fused` (custom VJPs with `optimization_barrier`s, per-sample
`lax.map`, `fori_loop`s over conv taps) on CPU, stock jax ops elsewhere. The tests compare the
paths op by op: for each family's training-form forward+backward and deploy forward, the
single-platform ``tpu`` and ``cuda`` exports of ``impl="auto"`` hold exactly the ops of the impl
that `halluvit_jax.layers.config.AUTO` names for that platform (``"accel"`` for TPU and CUDA,
whose hMHSA core has the hallucination moved onto the keys and every other layer plain), the same
count of every op kind, apart from what `platform_dependent` adds:
one ``case`` per layer on a constant platform index, its ``return``s and constants (a splat
constant inside a ``case`` region is lowered as a ``broadcast_in_dim`` of a scalar constant,
counted as a constant here). No ``while``, ``optimization_barrier`` or ``custom_call`` reaches
those platforms, and the explicit impls hold no ``case`` at all: a sub-layer that is not given
the model's ``impl`` runs its own default ("auto") and shows up as cases in such an export
(and as fused ops in its CPU export), which `test_a_sub_layer_that_ignores_impl_is_caught`
shows on a model built to forget it. Private functions are inlined when counting (a call and
its inlined body count the same).

The fast tier compares the reduced models of tests/test_impl_equivalence.py (one trace per
path; lowering is cheap next to tracing); the slow tier compares every registered name at full
size (abstract shapes: nothing is allocated). The package's sharded train step on a 2x2x2 mesh
and bfloat16 compute lower too.
"""

from __future__ import annotations

import collections
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

import halluvit_jax as hv
from halluvit_jax.layers import Attention, LayerNorm, Mlp
from halluvit_jax.layers.config import AUTO
from halluvit_jax.layers.kernels import hmhsa_triton
from halluvit_jax.train import optim, sharding, trainer

ACCELERATORS = ("tpu", "cuda")
# What `lax.platform_dependent` adds to an accelerator export of "auto": a `case` on the
# platform index (a constant), its regions' `return`s, and constants.
PLATFORM_DEPENDENT_KINDS = {"stablehlo.case", "stablehlo.return", "stablehlo.constant"}
# Ops only the CPU kernels emit (the custom VJPs' barriers, the conv-tap and per-sample loops);
# no custom call at all is expected from these models.
FUSED_ONLY_KINDS = ("stablehlo.while", "stablehlo.optimization_barrier", "stablehlo.custom_call")
# The reduced models of tests/test_impl_equivalence.py: every block kind of each family.
REDUCED = {
    "deit_tiny_hal": (dict(depth=1, img_size=32, patch_size=8), 32),
    "pvt_v2_b0_hal": (dict(depths=(1, 0, 0, 1)), 64),
    "nextvit_small_hal": (dict(depths=(1, 1, 5, 1), conv_widths=(32, 32, 64, 64),
                               transformer_widths=(128, 128, 128), stem_chs=(16, 16, 16),
                               head_dim=16, drop_path_rate=0.0), 64),
}

# --------------------------------------------------------------------------------------------
# Counting ops in StableHLO text.

_FUNC = re.compile(r"^  func\.func (?:public |private )?@([\w.$-]+)")
_OP = re.compile(r'(?:^\s*|=\s*|applies\s+)"?((?:stablehlo|chlo|func|mhlo|sdy)\.[a-z_0-9]+)')
_CALL = re.compile(r"(?:^|[=\s])(?:func\.)?call @([\w.$-]+)")
_SCALAR_CONSTANT_BROADCAST = re.compile(r"stablehlo\.broadcast_in_dim %(?:c|cst)(?:_\d+)?, dims = \[\] ")


def op_counts(text: str) -> collections.Counter:
    """Count of every op kind reachable from ``main``, private functions inlined (``func.call``,
    ``func.func`` and ``func.return`` are not counted; a callee's ops count once per call)."""
    own: dict[str, collections.Counter] = {}
    calls: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        if m := _FUNC.match(line):
            name = m.group(1)
            own[name], calls[name] = collections.Counter(), []
            continue
        if name is None:
            continue
        if line == "  }":
            name = None
            continue
        calls[name] += _CALL.findall(line)
        for m in _OP.finditer(line):
            kind = m.group(1)
            if kind in ("func.call", "func.return"):  # printed "call" / "return" in a func body
                continue
            if kind == "stablehlo.broadcast_in_dim" and _SCALAR_CONSTANT_BROADCAST.search(line):
                kind = "stablehlo.constant"  # a splat constant, as lowered inside a region
            own[name][kind] += 1

    @functools.cache
    def total(fn: str) -> collections.Counter:
        counts = collections.Counter(own[fn])
        for callee in calls[fn]:
            counts += total(callee)
        return counts

    assert "main" in own, "no main function in the module"
    return total("main")


def expected_impl(platform: str) -> str:
    """The explicit impl whose export a platform's ``impl="auto"`` export must match (`AUTO`;
    plain for CPU, where auto's fused export is not compared but plain is checked)."""
    return "plain" if platform == "cpu" else AUTO.get(platform, "plain")


def expected_exports(export, platforms) -> dict[str, str]:
    """``{platform: export of expected_impl(platform)}`` from ``export(impl, platforms)``."""
    by_impl: dict[str, list[str]] = {}
    for platform in platforms:
        by_impl.setdefault(expected_impl(platform), []).append(platform)
    out: dict[str, str] = {}
    for impl, group in by_impl.items():
        out.update(export(impl, tuple(group)))
    return out


def path_problems(expected: dict[str, str], auto: dict[str, str]) -> list[str]:
    """What is wrong with a model's exports, per platform ``{platform: StableHLO text}`` of the
    same function with ``impl=expected_impl(platform)`` and ``impl="auto"``; empty when the
    paths are right."""
    problems = []
    for platform in expected:
        impl = expected_impl(platform)
        p, a = op_counts(expected[platform]), op_counts(auto[platform])
        if p["stablehlo.case"]:
            problems.append(f"{platform}: impl={impl!r} holds {p['stablehlo.case']} platform case(s): "
                            "a sub-layer does not get the model's impl")
        found = {k: p[k] for k in FUSED_ONLY_KINDS if p[k]}
        if found:
            problems.append(f"{platform}: impl={impl!r} holds fused-only ops {found}")
        if platform == "cpu":
            continue
        found = {k: a[k] for k in FUSED_ONLY_KINDS if a[k]}
        if found:
            problems.append(f"{platform}: impl='auto' holds fused-only ops {found}")
        diff = {k: a[k] - p[k] for k in sorted(set(a) | set(p)) if a[k] != p[k]}
        other = {k: d for k, d in diff.items() if k not in PLATFORM_DEPENDENT_KINDS or d < 0}
        if other:
            problems.append(f"{platform}: impl='auto' and impl={impl!r} differ beyond "
                            f"platform_dependent's case/return/constant: {other}")
    return problems


def _exports(fn, args, platforms) -> dict[str, str]:
    """Single-platform exports of ``fn`` (one trace: jit caches it across the platforms)."""
    jitted = jax.jit(fn)
    # impl="pallas" lowers to Triton calls on CUDA, which carry no compatibility guarantee.
    checks = [jax.export.DisabledSafetyCheck.custom_call(hmhsa_triton.CUSTOM_CALL)]
    return {p: jax.export.export(jitted, platforms=[p], disabled_checks=checks)(*args).mlir_module()
            for p in platforms}


def _abstract_init(model, x):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))


def _train_and_deploy(make, x):
    """One function of a model's training-form forward+backward (params gradient, updated
    BatchNorm statistics) and its deploy-form forward, and its abstract arguments."""
    model = make()
    deploy = hv.deploy_form(model)
    variables, deploy_vars = _abstract_init(model, x), _abstract_init(deploy, x)

    def fn(variables, deploy_vars, x, rng):
        def loss(params):
            logits, new = model.apply({**variables, "params": params}, x, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": rng})
            return jnp.mean(logits.astype(jnp.float32) ** 2), new
        return jax.grad(loss, has_aux=True)(variables["params"]), deploy.apply(deploy_vars, x)

    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    return fn, (variables, deploy_vars, x, rng)


def _model_exports(name, overrides, size, impl, platforms=ACCELERATORS, dtype=None, batch=2):
    make = lambda: hv.create_model(name, impl=impl, dtype=dtype, **overrides)  # noqa: E731
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return _exports(*_train_and_deploy(make, x), platforms)


# --------------------------------------------------------------------------------------------
# Every family: auto = the platform's impl on the accelerators.


# DeiT in the fast tier; PVTv2 and NextViT (~15 and ~25 s of tracing) in the slow one.
@pytest.mark.parametrize("name", [n if n.startswith("deit") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(REDUCED)])
def test_auto_lowers_to_the_platforms_impl_on_accelerators(name):
    overrides, size = REDUCED[name]
    overrides = {**overrides, "num_classes": 10}
    platforms = (*ACCELERATORS, "cpu")
    export = lambda impl, ps: _model_exports(name, overrides, size, impl, ps)  # noqa: E731
    expected = expected_exports(export, platforms)
    auto = export("auto", platforms)
    assert path_problems(expected, auto) == []
    # Not vacuous: "auto" dispatches in every layer (one case each), its CPU export holds the
    # fused kernels that the accelerator exports must not, and its accelerator exports hold the
    # accel hMHSA core, not the plain one (accel computes the hallucinated heads' logits by a
    # matmul against IHH-transformed keys, and runs attn @ v per half: more dot_generals).
    counts = {p: op_counts(auto[p]) for p in platforms}
    assert counts["tpu"]["stablehlo.case"] >= 10
    assert counts["tpu"]["stablehlo.case"] == counts["cuda"]["stablehlo.case"]
    assert counts["cpu"]["stablehlo.optimization_barrier"] and counts["cpu"]["stablehlo.while"]
    assert op_counts(expected["tpu"])["stablehlo.dot_general"] > 0
    plain = op_counts(export("plain", ("tpu",))["tpu"])["stablehlo.dot_general"]
    assert counts["tpu"]["stablehlo.dot_general"] == counts["cuda"]["stablehlo.dot_general"] > plain


def test_pallas_on_cuda_runs_the_triton_kernels():
    """``impl="pallas"`` lowers hMHSA's core to the Triton kernels on CUDA (the forward in the
    train step and the deploy forward, ``dq`` and ``dk``/``dv`` in the backward; one set per
    layer) and to the Mosaic kernel on TPU; a layer with more real heads than the kernels take
    runs the accel core on CUDA (as many dot_generals as ``impl="accel"``, no custom call)."""
    overrides, size = REDUCED["deit_tiny_hal"]
    overrides = {**overrides, "num_classes": 10}
    export = lambda impl, ps, **o: _model_exports("deit_tiny_hal", {**overrides, **o}, size, impl, ps)  # noqa: E731
    pallas = export("pallas", ("cuda", "tpu"))
    names = collections.Counter(re.findall(r'custom_call @__gpu\$xla\.gpu\.triton\(.*? name = "(\w+)"',
                                           pallas["cuda"]))
    depth = overrides["depth"]
    assert names == {"hmhsa_fwd_triton": 2 * depth, "hmhsa_dq_triton": depth, "hmhsa_dkv_triton": depth}
    assert "tpu_custom_call" in pallas["tpu"] and "xla.gpu.triton" not in pallas["tpu"]
    # 10 heads, 5 real: past hmhsa_triton.MAX_REAL_HEADS, the layer runs the accel core.
    dots = lambda text: op_counts(text)["stablehlo.dot_general"]  # noqa: E731
    wide = dict(num_heads=10, embed_dim=80)
    cuda = export("pallas", ("cuda",), **wide)["cuda"]
    assert "stablehlo.custom_call" not in cuda
    assert dots(cuda) == dots(export("accel", ("cuda",), **wide)["cuda"]) > dots(export("plain", ("cuda",), **wide)["cuda"])


@pytest.mark.slow
@pytest.mark.parametrize("name", hv.list_models())
def test_every_registered_model_lowers_auto_to_the_platforms_impl(name):
    size = hv.get_input_config(name).input_size
    export = lambda impl, ps: _model_exports(name, {}, size, impl, ps)  # noqa: E731
    assert path_problems(expected_exports(export, ACCELERATORS), export("auto", ACCELERATORS)) == []


class _Block(nn.Module):
    """A pre-norm transformer block; ``forget``: its FFN is built without ``impl=`` (so it runs
    the layer's default, "auto", whatever the model asks for): the mistake the checker catches."""

    impl: str
    forget: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        x = x + Attention(32, 4, impl=self.impl)(LayerNorm(impl=self.impl)(x), train=train)
        mlp_kwargs = {} if self.forget else {"impl": self.impl}
        return x + Mlp(64, **mlp_kwargs)(LayerNorm(impl=self.impl)(x), train=train)


def test_a_sub_layer_that_ignores_impl_is_caught():
    x = jax.ShapeDtypeStruct((2, 9, 32), jnp.float32)
    platforms = (*ACCELERATORS, "cpu")

    def exports(impl, forget, ps=platforms):
        module = _Block(impl, forget)
        variables = _abstract_init(module, x)

        def fn(variables, x):
            return jax.value_and_grad(lambda v, x: jnp.sum(module.apply(v, x, train=True) ** 2))(
                variables, x)
        return _exports(fn, (variables, x), ps)

    expected = lambda forget: expected_exports(lambda i, ps: exports(i, forget, ps), platforms)  # noqa: E731
    assert path_problems(expected(False), exports("auto", False)) == []
    problems = path_problems(expected(True), exports("auto", True))
    assert any(p.startswith("tpu: impl='accel' holds") and "platform case" in p for p in problems), problems
    assert any(p.startswith("cuda: impl='accel' holds") and "platform case" in p for p in problems), problems
    assert any(p.startswith("cpu: impl='plain' holds fused-only ops") for p in problems), problems


def test_op_counts_inline_private_functions_and_count_scalar_constant_broadcasts_as_constants():
    text = "\n".join([
        "module @m {",
        "  func.func public @main(%arg0: tensor<2xf32>) -> tensor<2xf32> {",
        "    %cst = stablehlo.constant dense<1.0> : tensor<f32>",
        "    %0 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<2xf32>",
        "    %1 = stablehlo.broadcast_in_dim %arg0, dims = [0] : (tensor<2xf32>) -> tensor<2xf32>",
        "    %2 = func.call @f(%0) : (tensor<2xf32>) -> tensor<2xf32>",
        "    %3 = call @f(%2) : (tensor<2xf32>) -> tensor<2xf32>",
        "    %4 = stablehlo.reduce(%3 init: %cst) applies stablehlo.add across dimensions = [0] : "
        "(tensor<2xf32>, tensor<f32>) -> tensor<f32>",
        "    return %3 : tensor<2xf32>",
        "  }",
        "  func.func private @f(%arg0: tensor<2xf32>) -> tensor<2xf32> {",
        "    %0 = stablehlo.multiply %arg0, %arg0 : tensor<2xf32>",
        "    return %0 : tensor<2xf32>",
        "  }",
        "}",
    ])
    assert op_counts(text) == {"stablehlo.constant": 2, "stablehlo.broadcast_in_dim": 1,
                               "stablehlo.multiply": 2, "stablehlo.reduce": 1, "stablehlo.add": 1}


def test_bfloat16_compute_lowers_for_accelerators():
    overrides, size = REDUCED["deit_tiny_hal"]
    export = lambda impl, ps: _model_exports("deit_tiny_hal", overrides, size, impl, ps,  # noqa: E731
                                             dtype=jnp.bfloat16)
    auto = export("auto", ACCELERATORS)
    assert path_problems(expected_exports(export, ACCELERATORS), auto) == []
    assert "bf16" in auto["tpu"]


@pytest.mark.slow  # ~20 s; python -m halluvit_jax.aot compiles the sharded step for TPU (test_aot.py)
def test_sharded_train_step_lowers_for_accelerators():
    """The package's train step, jitted with the trainer's shardings on a 2x2x2 mesh of the 8
    virtual CPU devices, exported for TPU and CUDA (8 devices each)."""
    assert jax.device_count() == 8
    mesh = sharding.create_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "model": 2}))
    model = hv.create_model("deit_tiny_hal", num_classes=10)
    optim_cfg = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
        no_decay_regex=optim.DEFAULT_NO_DECAY_REGEX, grad_clip_norm=1.0, grad_accum_steps=1))
    lr_fn = optax.constant_schedule(1e-3)
    tx = optim.create_optimizer(optim_cfg, lr_fn)
    init = functools.partial(trainer.create_train_state, model=model, tx=tx, image_size=224,
                             use_ema=True)
    abstract_state = jax.eval_shape(init, jax.random.key(0))
    state_sh = sharding.infer_shardings(abstract_state, mesh, fsdp_min_size=256,
                                        logical_axes=sharding.logical_axes(model, 224))
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((16, 224, 224, 3), jnp.float32, sharding=batch_sh),
             "label": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=batch_sh)}
    step = jax.jit(
        sharding.with_axis_rules(mesh, functools.partial(
            trainer.train_step, apply_fn=model.apply, tx=tx,
            targets_fn=lambda rng, x, y: (x, jax.nn.one_hot(y, 10)), learning_rate_fn=lr_fn,
            ema_decay=0.999)),
        in_shardings=(state_sh, batch_sh, sharding.replicated(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
    )
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    exported = jax.export.export(step, platforms=ACCELERATORS)(abstract_state, batch, rng)
    assert exported.nr_devices == 8
    text = exported.mlir_module()
    assert "stablehlo.while" not in text
    assert "mhlo.sharding" in text or "sdy.sharding" in text
    # fc1 is sharded over 'fsdp' x 'model', as the trainer lays it out (the joined qkv over
    # 'fsdp' only: the forward reads it per head).
    fc1 = state_sh.params["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.spec == jax.sharding.PartitionSpec("fsdp", "model")
