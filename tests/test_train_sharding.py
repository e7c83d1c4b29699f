"""Sharding (8 virtual devices): parameter layouts from the layers' logical axis names, and
sharded training (mesh data=2 x fsdp=2 x model=2) equal to 1-device training."""

from __future__ import annotations

import functools
import logging

import data_fixtures as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_train_common import read_metrics, tiny_demo_config, train_losses

import halluvit_jax as hv
from halluvit_jax.layers.attention import per_head_views
from halluvit_jax.train import sharding, train_and_evaluate


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return dfx.prepared_demo(tmp_path_factory)


@pytest.mark.slow  # ~50 s: 8 devices compiling the 3-axis step
def test_sharded_2x2x2_matches_one_device(demo_dir, tmp_path, caplog):
    assert jax.device_count() == 8
    kw = dict(total_steps=4, checkpoint_every_steps=None, eval_every_steps=4, fsdp_min_size=256)
    kw["model.drop_path_rate"] = 0.1  # dropout RNG must not depend on the sharding either
    one = tiny_demo_config(demo_dir, **kw, **{"mesh.num_devices": 1})
    eight = tiny_demo_config(demo_dir, **kw, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2})
    shardy_before = jax.config.jax_use_shardy_partitioner
    s1 = train_and_evaluate(one, str(tmp_path / "one"))
    with caplog.at_level(logging.INFO):
        s8 = train_and_evaluate(eight, str(tmp_path / "eight"))
    # fsdp and model both split: the trainer compiled with GSPMD (Shardy's wrong values, below),
    # said so, and left JAX's setting as it was.
    assert "Partitioner: GSPMD" in caplog.text
    assert jax.config.jax_use_shardy_partitioner == shardy_before

    # The 8-device state really is sharded: fc1 over 'fsdp' and 'model', the joined qkv (read
    # per head in the forward) over 'fsdp' only, its optimizer moments alike.
    fc1 = s8.params["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == P("fsdp", "model")
    assert len({str(s.index) for s in fc1.addressable_shards}) == 4
    assert s8.params["blocks_0"]["attn"]["qkv"]["kernel"].sharding.spec == P(None, "fsdp")

    l1, l8 = train_losses(str(tmp_path / "one")), train_losses(str(tmp_path / "eight"))
    assert sorted(l1) == [1, 2, 3, 4] and sorted(l8) == [1, 2, 3, 4]
    for step in l1:
        assert l8[step] == pytest.approx(l1[step], rel=1e-5, abs=1e-6), step
    # Losses move (the test would not notice a frozen model otherwise).
    assert l1[4] != l1[1]
    p1, p8 = jax.device_get(s1.params), jax.device_get(s8.params)
    # Adam turns rounding-sized differences of near-zero gradients into lr-sized steps: the
    # parameters agree to ~lr; the losses above are the tight check.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-3), p1, p8)
    # cFFN BatchNorm running statistics are global-batch statistics on both.
    b1, b8 = jax.device_get(s1.batch_stats), jax.device_get(s8.batch_stats)
    assert jax.tree_util.tree_leaves(b1), "deit_tiny_hal has cFFN BatchNorm statistics"
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), b1, b8)
    e1 = [m for m in read_metrics(str(tmp_path / "one")) if "eval/top1" in m][-1]
    e8 = [m for m in read_metrics(str(tmp_path / "eight")) if "eval/top1" in m][-1]
    assert e1["eval/top1"] == e8["eval/top1"]
    assert e8["eval/loss"] == pytest.approx(e1["eval/loss"], rel=1e-5)

    # The 8-device checkpoint restores onto a 1-device mesh (another mesh and device count): the
    # run resumes at its last step, so nothing is trained and the state is the saved one.
    restored = train_and_evaluate(one, str(tmp_path / "eight"))
    assert int(restored.step) == 4
    assert restored.params["blocks_0"]["attn"]["qkv"]["kernel"].sharding.num_devices == 1
    r = jax.device_get(restored.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), r, p8)


# ----------------------------------------------------------------------------------------------
# Logical axes -> mesh axes (8 virtual CPU devices).


def _mesh(**sizes):
    return sharding.create_mesh({"data": -1, "fsdp": 1, "model": 1, **sizes})


def _specs(name, mesh, fsdp_min_size=2**14, **overrides):
    model = hv.create_model(name, **overrides)
    size = hv.get_input_config(name).input_size
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                               jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    shardings = sharding.infer_shardings(variables, mesh, logical_axes=sharding.logical_axes(model, size),
                                         fsdp_min_size=fsdp_min_size)
    return jax.tree.map(lambda s: s.spec, shardings)


def test_partition_specs_from_logical_axes():
    mesh = _mesh(data=2, fsdp=2, model=2)
    spec = lambda path, shape, names: sharding.infer_partition_spec(  # noqa: E731
        path, shape, mesh, names=names, fsdp_min_size=64)
    # Column-parallel fc1, row-parallel fc2: 'mlp' over 'model', the other dim over 'fsdp'.
    assert spec("params/b/mlp/fc1/kernel", (64, 128), ("embed", "mlp")) == P("fsdp", "model")
    assert spec("params/b/mlp/fc2/kernel", (128, 64), ("mlp", "embed")) == P("model", "fsdp")
    # A mesh axis splits one dimension of a leaf at most: fc2a's 'compact' stays for FSDP.
    assert spec("params/b/mlp/fc2a/branch_kernel", (2, 128, 40), ("branch", "mlp", "compact")) \
        == P(None, "model", "fsdp")
    # Sizes the axis does not divide stay whole; small leaves and undeclared ones: FSDP only.
    assert spec("params/b/mlp/fc1/kernel", (64, 127), ("embed", "mlp")) == P("fsdp")
    assert spec("params/b/norm1/scale", (32,), ("embed",)) == P()
    assert spec("params/patch_embed/kernel", (16, 16, 3, 64), None) == P(None, None, None, "fsdp")
    assert spec("step", (), ()) == P()
    # Explicit rules win.
    rules = [("pos_embed", "replicate"), ("head/kernel", (None, "model"))]
    assert sharding.infer_partition_spec("params/pos_embed", (1, 64, 64), mesh, rules=rules) == P()
    assert sharding.infer_partition_spec("params/head/kernel", (64, 10), mesh, names=("embed", "classes"),
                                         rules=rules) == P(None, "model")
    with pytest.raises(ValueError, match="At most one mesh axis"):
        sharding.create_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.create_mesh({"data": 3, "fsdp": 2, "model": 2})


def test_cffn_factors_and_hal_qkv_under_model_2():
    """The cFFN factors are sharded after the column-parallel fc1 (fc2a row-parallel over the
    hidden units, fc2b over c'), the joined hal qkv is not cut (it is read per head), and
    optimizer moments and BatchNorm statistics follow their parameter."""
    specs = _specs("deit_tiny_hal", _mesh(model=2), depth=1)
    block = specs["params"]["blocks_0"]
    assert block["mlp"]["fc1"]["kernel"] == P(None, "model")
    assert block["mlp"]["fc2a"]["branch_kernel"] == P(None, "model")
    assert block["mlp"]["fc2a"]["bn"]["scale"] == P(None, "model")
    assert specs["batch_stats"]["blocks_0"]["mlp"]["fc2a"]["bn"]["mean"] == P(None, "model")
    assert block["mlp"]["fc2b"]["branch_kernel"] == P(None, "model")
    assert block["attn"]["qkv"]["kernel"] == P()
    assert block["attn"]["ihh_kernel"] == P("model")  # IHH is per real head
    deploy = _specs("deit_tiny_hal", _mesh(model=2), depth=1, deploy=True)["params"]["blocks_0"]["mlp"]
    assert (deploy["fc2a"]["kernel"], deploy["fc2b"]["kernel"]) == (P("model"), P("model"))
    w1 = _specs("pvt_v2_b0_hal", _mesh(model=2), depths=(1, 1, 1, 1),
                hal=hv.HalConfig(factorize="w1"))["params"]
    mlp = w1["stages_1"]["blocks_0"]["mlp"]  # c' = 38 (stage 0's 19 is odd: not split)
    assert mlp["fc1a"]["branch_kernel"] == P(None, None, "model")
    assert mlp["fc1b"]["branch_kernel"] == P(None, "model")
    assert mlp["dwconv"]["conv"]["kernel"] == P(None, None, None, "model")


def _head_columns(view, mesh):
    """Per model shard, the sorted column indices of ``view`` (a [C, width] kernel) it holds."""
    cols = {}
    for shard in view.addressable_shards:
        m = mesh.devices.flatten().tolist().index(shard.device) % mesh.shape["model"]
        cols.setdefault(m, set()).update(range(*shard.index[1].indices(view.shape[1])))
    return {m: sorted(c) for m, c in cols.items()}


@pytest.mark.parametrize("name, heads", [("deit_tiny_hal", 4), ("deit_small_hal", 6)])
def test_hal_qkv_is_read_by_head_under_model_2(name, heads):
    """Inside `axis_rules`, q' | k' | v (widths C/2, C/2, C in one stored kernel) are read per
    part, each split by whole heads over 'model' where its head count divides: DeiT-T-hal's 2
    real heads split, DeiT-S-hal's 3 do not (q', k' replicated) while its 6 v heads do."""
    mesh = _mesh(model=2)
    model = hv.create_model(name)
    c = model.embed_dim
    d, hr = c // heads, heads // 2
    widths = (hr * d, hr * d, c)
    kernel = jnp.arange(c * 2 * c, dtype=jnp.float32).reshape(c, 2 * c)
    p = {"qkv": {"kernel": kernel}, "proj": {"kernel": jnp.ones((c, c))}}
    views = jax.jit(sharding.with_axis_rules(mesh, lambda p: per_head_views(p, widths, d)))(p)
    for part, lo in (("q", 0), ("k", hr * d), ("v", 2 * hr * d)):
        np.testing.assert_array_equal(views[part]["kernel"], kernel[:, lo:lo + views[part]["kernel"].shape[1]])
        cols = _head_columns(views[part]["kernel"], mesh)
        n = views[part]["kernel"].shape[1] // d
        if n % 2:
            assert views[part]["kernel"].sharding.spec == P(), part
            continue
        assert views[part]["kernel"].sharding.spec == P(None, "model"), part
        for m, held in cols.items():  # whole heads, m-th half of this part's heads
            assert held == list(range(m * n // 2 * d, (m + 1) * n // 2 * d)), (part, m)
    assert views["proj"]["kernel"].sharding.spec == P("model")
    # Outside the rules the views are the plain slices.
    plain = per_head_views(p, widths, d)
    np.testing.assert_array_equal(plain["v"]["kernel"], kernel[:, 2 * hr * d:])


def _sgd_step(model, variables, images, labels):
    def loss_fn(params):
        logits, updates = model.apply({**variables, "params": params}, images, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
        loss = -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, 10), -1))
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda w, g: w - 0.1 * g, variables["params"], grads)
    return loss, {**updates, "params": params}, grads


# Under data=2 x fsdp=2 x model=2, Shardy (JAX's default partitioner) compiles two hal steps to
# wrong values on this CPU with jax 0.10.2: PVTv2-b0-hal's plain and accel steps give a wrong loss
# (2.293 against 2.186; it needs the cFFN's fc2a kernel and its BatchNorm scale split together,
# a reduced program of those ops alone is right). GSPMD compiles them right, so the trainer and
# the aot tool take GSPMD on meshes that split both fsdp and model (`sharding.partitioner_for`).
# (DeiT-T-hal's accel step also doubled its IHH kernel gradient under Shardy there: that was the
# grouped-conv bug below, which `grouped_conv3x3` now avoids with either partitioner.)
# Strict, so that a JAX whose Shardy is fixed shows.
SHARDY_WRONG = pytest.mark.xfail(strict=True, reason=(
    "Shardy in jax 0.10.2 compiles this hal step under data=2 x fsdp=2 x model=2 to wrong values "
    "on CPU; see the comment above"))
MESH_2X2X2 = {"data": 2, "fsdp": 2, "model": 2}


def _sharded_step_matches(name, impl, sizes, partitioner=None, **overrides):
    size = 64 if name.startswith("nextvit") else 32
    kw = (dict(img_size=32, depth=2) if name.startswith("deit") else
          dict(depths=(1, 1, 5, 1), stem_chs=(16, 16, 24), conv_widths=(32, 48, 48, 96),
               transformer_widths=(128, 128, 128), head_dim=16) if name.startswith("nextvit") else
          dict(depths=(1, 1, 1, 1)))
    model = hv.create_model(name, num_classes=10, drop_path_rate=0.1, impl=impl, **kw, **overrides)
    images = jax.random.normal(jax.random.key(2), (8, size, size, 3))
    labels = jnp.arange(8) % 10
    variables = model.init(jax.random.key(0), images)
    step = functools.partial(_sgd_step, model)
    loss1, new1, grads1 = jax.jit(step)(variables, images, labels)

    mesh = _mesh(**sizes)
    var_sh = sharding.infer_shardings(variables, mesh, logical_axes=sharding.logical_axes(model, size),
                                      fsdp_min_size=256)
    batch_sh = sharding.batch_sharding(mesh)
    sharded = jax.jit(sharding.with_axis_rules(mesh, step), in_shardings=(var_sh, batch_sh, batch_sh),
                      out_shardings=(sharding.replicated(mesh), var_sh, var_sh["params"]))
    with sharding.use_partitioner(partitioner or sharding.partitioner_for(mesh)):
        loss8, new8, grads8 = sharded(jax.device_put(variables, var_sh), images, labels)
    fc1 = new8["params"]["blocks_0" if name.startswith("deit") else "stages_0" if name.startswith("pvt")
                         else "stages_2"]
    if overrides:  # they may leave that block whole on every device: any sharded leaf then
        fc1 = new8["params"]
    assert any(s.spec != P() for s in jax.tree.leaves(jax.tree.map(lambda a: a.sharding, fc1)))
    assert float(loss8) == pytest.approx(float(loss1), rel=1e-5)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
    jax.tree.map(close, jax.device_get(grads8), jax.device_get(grads1))
    jax.tree.map(close, jax.device_get(new8), jax.device_get(new1))


@pytest.mark.slow  # ~30 s per model: the step compiled sharded and unsharded
@pytest.mark.parametrize("name,impl,sizes", [
    ("deit_tiny_hal", "auto", MESH_2X2X2), ("pvt_v2_b0_hal", "auto", MESH_2X2X2),
    ("deit_tiny_hal", "accel", {"data": 4, "model": 2}),
    # 3 real heads do not split over model=2: q', k' (and the IHH conv's input) stay replicated
    # over it, where XLA's kernel gradient of the conv came out doubled (see below).
    ("deit_small_hal", "accel", {"data": 4, "model": 2}),
    # NextViT's MHCA grouped conv: its kernel is not split over model (see below).
    ("nextvit_small_hal", "accel", {"data": 4, "model": 2}),
    ("deit_tiny_hal", "accel", MESH_2X2X2),
    ("pvt_v2_b0_hal", "accel", {"data": 4, "model": 2}),
    ("pvt_v2_b0_hal", "accel", {"data": 2, "fsdp": 4}),
    ("pvt_v2_b0_hal", "accel", MESH_2X2X2),
    ("pvt_v2_b0_hal", "plain", MESH_2X2X2)])
def test_sharded_step_equals_unsharded(name, impl, sizes):
    """One SGD step (cFFN BatchNorm in train mode) on a mesh with the logical-axis shardings and
    the per-head views, compiled with the partitioner the trainer picks for the mesh, equals the
    1-device step. ``auto`` is the fused path on this CPU; ``accel`` is the path TPU and GPU run
    (the cFFN's batch statistics from Gram matrices and one-pass sums over the sharded batch)."""
    _sharded_step_matches(name, impl, sizes)


@pytest.mark.slow  # ~30 s
@pytest.mark.parametrize("impl", ["plain", "accel"])
def test_ffn_dwconv_with_a_hidden_width_model_does_not_split(impl):
    """PVTv2's FFN dwconv on maps that stay whole over ``model``: a first-stage hidden width of
    241 (``mlp_ratio`` 241/32) does not divide by model=2, so ``fc1``'s output, the dwconv's
    input, is replicated over it. The plain lax convolution's kernel gradient came out twice the
    1-device one there (the grouped-conv bug below); through `grouped_conv3x3` it is right."""
    _sharded_step_matches("pvt_v2_b0_hal", impl, {"data": 4, "model": 2},
                          mlp_ratios=(241 / 32, 8.0, 4.0, 4.0))


@pytest.mark.slow
@pytest.mark.parametrize("name,impl", [pytest.param("pvt_v2_b0_hal", "plain", marks=SHARDY_WRONG)])
def test_shardy_under_fsdp_and_model(name, impl):
    """The reason `partitioner_for` avoids Shardy under fsdp x model: the same steps compiled with
    Shardy compute wrong values (xfail, strict: a fixed JAX turns this red, and "auto" can go)."""
    _sharded_step_matches(name, impl, MESH_2X2X2, partitioner="shardy")


@pytest.mark.parametrize("sizes", [{"data": 4, "model": 2}, MESH_2X2X2], ids=["data4_model2", "2x2x2"])
def test_depthwise_conv_kernel_gradient_on_a_mesh(sizes):
    """XLA's SPMD partitioners (Shardy and GSPMD alike, jax 0.10.2) return the kernel gradient of
    a depthwise conv (autodiff's convolution with ``batch_group_count``) times the size of the
    mesh axes its batch-split input is replicated over: twice the 1-device gradient under
    ``model=2`` (asserted, so that a fixed XLA shows). `grouped_conv3x3`, which the accel IHH
    conv, NextViT's MHCA and the FFN dwconv use, sums nine products there instead: the 1-device
    gradient."""
    import functools as ft

    from jax.sharding import NamedSharding

    from halluvit_jax.layers import axes
    from halluvit_jax.layers.common import _grouped_conv3x3, grouped_conv3x3

    mesh = _mesh(**sizes)
    grid = jax.random.normal(jax.random.key(0), (8, 4, 4, 6))
    taps = jax.random.normal(jax.random.key(1), (3, 3, 1, 12))  # depthwise, 2 outputs per channel
    groups3 = jax.random.normal(jax.random.key(3), (3, 3, 2, 6))  # 3 groups of 2 -> 2 channels

    def grads(conv, kernel):
        grad = jax.grad(lambda g, t: jnp.sum(jnp.sin(conv(g, t))), argnums=(0, 1))

        def traced(g, t):
            with axes.device_mesh(mesh, sharding.BATCH_AXES):  # as `sharding.axis_rules` does
                return grad(g, t)
        one = jax.jit(grad)(grid, kernel)
        f = jax.jit(traced, in_shardings=(sharding.batch_sharding(mesh), NamedSharding(mesh, P())))
        with sharding.use_partitioner(sharding.partitioner_for(mesh)):
            return one, f(grid, kernel)

    for kernel, groups in ((taps, 6), (groups3, 3)):
        (g1, t1), (g8, t8) = grads(lambda g, t, n=groups: grouped_conv3x3(g, t, n), kernel)
        np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(t8, t1, rtol=1e-5, atol=1e-5)
    (g1, t1), (g8, t8) = grads(ft.partial(_grouped_conv3x3, groups=6, preferred_element_type=None), taps)
    np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-5)  # the input gradient is right
    ratio = float(jnp.sum(t8 * t1) / jnp.sum(t1 * t1))
    if ratio == pytest.approx(1.0, rel=1e-4):
        pytest.fail("XLA's depthwise kernel gradient is right on this mesh now: the workaround "
                    "(`grouped_conv3x3`'s mesh branch) can go", pytrace=False)
    assert ratio == pytest.approx(2.0, rel=1e-4)  # the model axis' size


def test_partitioner_for_meshes():
    """GSPMD only where both fsdp and model split (and when asked); JAX's setting elsewhere."""
    default = "shardy" if jax.config.jax_use_shardy_partitioner else "gspmd"
    assert sharding.partitioner_for(_mesh(data=2, fsdp=2, model=2)) == "gspmd"
    assert sharding.partitioner_for(_mesh(fsdp=4, model=2)) == "gspmd"
    assert sharding.partitioner_for(_mesh(data=4, model=2)) == default
    assert sharding.partitioner_for(_mesh(data=2, fsdp=4)) == default
    assert sharding.partitioner_for(_mesh(data=4, model=2), "gspmd") == "gspmd"
    assert sharding.partitioner_for(_mesh(data=2, fsdp=2, model=2), "shardy") == "shardy"
    with pytest.raises(ValueError, match="mesh.partitioner must be one of"):
        sharding.partitioner_for(_mesh(data=8), "xla")
    before = jax.config.jax_use_shardy_partitioner
    with sharding.use_partitioner("gspmd"):
        assert not jax.config.jax_use_shardy_partitioner
    with sharding.use_partitioner("shardy"):
        assert jax.config.jax_use_shardy_partitioner
    assert jax.config.jax_use_shardy_partitioner == before


@pytest.mark.parametrize("sizes", [{}, {"model": 2}], ids=["data8", "data4_model2"])
def test_pallas_core_runs_per_batch_shard(sizes):
    """``impl="pallas"`` under a mesh: XLA cannot partition a Mosaic kernel, so the core runs in a
    shard_map per batch shard (`axes.per_batch_shard`); values and gradients (the IHH/CHH weights'
    summed over the shards) equal the plain layer's on one device. The kernel runs interpreted on
    CPU; tests/test_aot.py compiles it sharded for TPU."""
    mesh = _mesh(**sizes)
    make = lambda impl: hv.layers.HalAttention(32, 4, hal_init="random", impl=impl)  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (8, 1 + 3 * 3, 32))
    kw = dict(kv_grid=(3, 3), num_prefix_tokens=1)
    variables = make("plain").init(jax.random.key(1), x, **kw)

    def loss(impl, v, x):
        return jnp.sum(jnp.sin(make(impl).apply(v, x, **kw)) * jnp.arange(32.0))

    grad = lambda impl: jax.value_and_grad(functools.partial(loss, impl))  # noqa: E731
    sharded = sharding.with_axis_rules(mesh, grad("pallas"))
    jaxpr = str(jax.make_jaxpr(sharded)(variables, x))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    assert "shard_map" not in str(jax.make_jaxpr(grad("pallas"))(variables, x))  # no mesh: the kernel itself
    repl, rows = jax.sharding.NamedSharding(mesh, P()), sharding.batch_sharding(mesh)
    got = jax.jit(sharded, in_shardings=(repl, rows))(variables, x)
    want = jax.jit(grad("plain"))(variables, x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(got[1]):
        w = functools.reduce(lambda t, k: t[k.key], path, want[1])
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("sizes,layout", [({}, "dwconv"), ({"model": 2}, "tokens"), ({"fsdp": 2}, "maps")],
                         ids=["data8_dwconv", "data4_model2_tokens", "data4_fsdp2_maps"])
def test_pallas_cffn_runs_per_batch_shard(sizes, layout, monkeypatch):
    """The cFFN's training kernels (`halluvit_jax.layers.kernels.cffn_pallas`) under a mesh: they
    run per batch shard and their sums (the branch outputs' statistics, a weight gradient) are
    reduced over the batch axes, so the output, the BatchNorms' running averages and the
    gradients equal the plain layer's on one device (kernels interpreted on CPU)."""
    mesh = _mesh(**sizes)
    dwconv = layout == "dwconv"  # PVTv2's FFN: the kernels after fc1's depthwise conv
    make = lambda impl: hv.layers.CompactMlp(48, act="relu", use_dwconv=dwconv, impl=impl)  # noqa: E731
    kw = {"grid": (3, 4)} if dwconv else {}
    x = jax.random.normal(jax.random.key(0), (8, 12, 16)) + 0.3
    if layout == "maps":  # NextViT's: the lanes kernels, their minimums lowered to 1 image per shard
        from halluvit_jax.layers.kernels import cffn_pallas
        monkeypatch.setattr(cffn_pallas, "LANES", 1)
        monkeypatch.setattr(cffn_pallas, "MIN_ROWS_PER_HIDDEN", 0)
        x = x.reshape(8, 3, 4, 16)
    variables = make("plain").init(jax.random.key(1), x, train=True, **kw)

    def loss(impl, params, x):
        out, upd = make(impl).apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"], **kw)
        return jnp.sum(jnp.sin(out) * jnp.arange(16.0)), upd["batch_stats"]

    grad = lambda impl: jax.value_and_grad(functools.partial(loss, impl), (0, 1), has_aux=True)  # noqa: E731
    sharded = sharding.with_axis_rules(mesh, grad("pallas"))
    jaxpr = str(jax.make_jaxpr(sharded)(variables["params"], x))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    repl, rows = jax.sharding.NamedSharding(mesh, P()), sharding.batch_sharding(mesh)
    (got_loss, got_stats), got_grads = jax.jit(sharded, in_shardings=(repl, rows))(variables["params"], x)
    (want_loss, want_stats), want_grads = jax.jit(grad("plain"))(variables["params"], x)
    # The loss sums 1536 terms of either sign: float32 summation order alone moves it by 1e-5
    # relative here (sharded vs one device: plain 6e-6, pallas 1.4e-5, measured).
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-4)
    for got, want in ((got_stats, want_stats), (got_grads, want_grads)):
        # atol: a share of the tree's largest entry (fc2a's BatchNorm bias has a gradient of
        # zero in exact arithmetic, fc2b's BatchNorm removing any shift; both sides hold noise).
        scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6 * scale),
                     jax.device_get(got), jax.device_get(want))
