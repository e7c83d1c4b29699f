"""Accelerator lowering without an accelerator: `jax.export` for ``tpu`` and ``cuda``.

With the default ``impl="auto"`` the CPU kernels (custom VJPs, per-sample `lax.map`,
`fori_loop`s over conv taps) must not reach an accelerator: every registered model's
training-form forward+backward and deploy forward, and the package's sharded train step on a
2x2x2 mesh, lower for both platforms and contain no ``stablehlo.while``. The fast tier checks one
model per family at full size (abstract shapes: nothing is allocated); the slow tier checks
every registered name. The CPU lowering of the same functions does contain the loops, which
shows the check can fail.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

import halluvit_jax as hv
from halluvit_jax.train import optim, sharding, trainer

ACCELERATORS = ("tpu", "cuda")
FAST_MODELS = ("deit_small_hal", "pvt_v2_b1_hal", "nextvit_small_hal")


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _model_functions(name: str, batch: int = 2, dtype=None):
    """``(train_grad, deploy_forward, args)`` of a model at full size, as abstract shapes."""
    model = hv.create_model(name, dtype=dtype)
    size = hv.get_input_config(name).input_size
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape)))
    deploy = hv.deploy_form(model)
    deploy_vars = jax.eval_shape(lambda: deploy.init(jax.random.key(0), jnp.zeros(x.shape)))

    def train_grad(variables, x, rng):
        def loss(params):
            logits, new = model.apply({**variables, "params": params}, x, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": rng})
            return jnp.mean(logits.astype(jnp.float32) ** 2), new
        return jax.grad(loss, has_aux=True)(variables["params"])

    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    return (train_grad, (variables, x, rng)), (deploy.apply, (deploy_vars, x))


def _lowered(fn, args, platforms) -> str:
    return jax.export.export(jax.jit(fn), platforms=platforms)(*args).mlir_module()


def _check_model(name: str, dtype=None):
    (train_fn, train_args), (deploy_fn, deploy_args) = _model_functions(name, dtype=dtype)
    for what, fn, args in (("train", train_fn, train_args), ("deploy", deploy_fn, deploy_args)):
        text = _lowered(fn, args, ACCELERATORS)
        assert "stablehlo.while" not in text, f"{name} {what}: a loop reached the accelerator path"
        assert "stablehlo.dot_general" in text


@pytest.mark.parametrize("name", FAST_MODELS)
def test_models_lower_for_accelerators_without_loops(name):
    _check_model(name)


def test_bfloat16_compute_lowers_for_accelerators():
    _check_model("deit_small_hal", dtype=jnp.bfloat16)
    (_, _), (deploy_fn, deploy_args) = _model_functions("deit_small_hal", dtype=jnp.bfloat16)
    text = _lowered(deploy_fn, deploy_args, ACCELERATORS)
    assert "bf16" in text


def test_cpu_lowering_holds_the_fused_loops():
    """The same check fails where the CPU kernels are lowered: the test can see a loop."""
    _, (deploy_fn, deploy_args) = _model_functions("pvt_v2_b0_hal")
    assert "stablehlo.while" in _lowered(deploy_fn, deploy_args, ["cpu"])
    assert "stablehlo.while" not in _lowered(deploy_fn, deploy_args, ["tpu"])


@pytest.mark.slow
@pytest.mark.parametrize("name", hv.list_models())
def test_every_registered_model_lowers_for_accelerators_without_loops(name):
    _check_model(name)


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
    state_sh = sharding.infer_shardings(abstract_state, mesh, fsdp_min_size=256)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((16, 224, 224, 3), jnp.float32, sharding=batch_sh),
             "label": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=batch_sh)}
    step = jax.jit(
        functools.partial(trainer.train_step, apply_fn=model.apply, tx=tx,
                          targets_fn=lambda rng, x, y: (x, jax.nn.one_hot(y, 10)),
                          learning_rate_fn=lr_fn, ema_decay=0.999),
        in_shardings=(state_sh, batch_sh, sharding.replicated(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
    )
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    exported = jax.export.export(step, platforms=ACCELERATORS)(abstract_state, batch, rng)
    assert exported.nr_devices == 8
    text = exported.mlir_module()
    assert "stablehlo.while" not in text
    assert "mhlo.sharding" in text or "sdy.sharding" in text
    # The qkv kernel is sharded over 'fsdp' x 'model', as the trainer lays it out.
    qkv = state_sh.params["blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.spec == jax.sharding.PartitionSpec("fsdp", "model")
