"""timm -> Flax conversion: logit parity with real timm models, errors, CLI and checkpoint I/O.

The golden fixtures (`tests/golden/{deit,pvt_v2}.npz`, from `make_timm_fixtures.py`) hold
reduced timm models' state_dicts, inputs and timm's logits, so parity is checked without
torch. Tests marked `timm` rebuild full-size timm models (random init, no download).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from halluvit_jax.checkpoint import read_checkpoint
from halluvit_jax.convert import (
    ConversionError,
    from_timm,
    save_variables,
    unwrap_state_dict,
)
from halluvit_jax.convert.__main__ import main as cli_main
from halluvit_jax.models import create_model
from halluvit_jax.models.deit import resample_pos_embed

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_fixture(family: str):
    z = np.load(os.path.join(GOLDEN, f"{family}.npz"))
    meta = json.loads(z["meta_json"].tobytes())
    sd = {k[len("sd/"):]: z[k] for k in z.files if k.startswith("sd/")}
    arrays = {k: z[k] for k in z.files if not k.startswith("sd/")}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["overrides"].items()}
    return sd, arrays, meta["ours"], overrides


def assert_logits_close(ours, ref, what: str) -> float:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max())
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert err < tol, f"{what}: max abs diff {err:.3g} >= {tol:.3g}"
    return err


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, x):
    return model.apply(variables, x)


def logits_of(name, overrides, variables, x):
    """Jitted with the module as a static argument: tests of the same model share a compile."""
    hashable = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return _apply(create_model(name, **hashable), variables, x)


# --------------------------------------------------------------------------------------------
# Parity on the reduced golden fixtures (no torch needed).


@pytest.mark.parametrize("family", ["deit", "pvt_v2"])
def test_reduced_fixture_logits_match_timm(family):
    sd, arrays, name, overrides = load_fixture(family)
    variables = from_timm(sd, name, **overrides)
    assert_logits_close(logits_of(name, overrides, variables, arrays["x"]), arrays["logits"], family)


def test_deit_pos_embed_resampled_to_new_resolution_matches_timm():
    """64px checkpoint loaded into a 96px model: timm resamples pos_embed 4x4 -> 6x6, so do we."""
    sd, arrays, name, overrides = load_fixture("deit")
    overrides = dict(overrides, img_size=96)
    variables = from_timm(sd, name, **overrides)
    assert variables["params"]["pos_embed"].shape == (1, 1 + 36, overrides["embed_dim"])
    assert_logits_close(logits_of(name, overrides, variables, arrays["x_96"]), arrays["logits_96"], "deit@96")


@pytest.mark.parametrize("grid", [(24, 24), (10, 10), (7, 9)])
def test_resample_pos_embed_matches_timm(grid):
    """Against timm's resample_abs_pos_embed (bicubic, antialias=True): up, down, non-square."""
    _, arrays, _, _ = load_fixture("deit")
    ref = arrays[f"posemb_{grid[0]}x{grid[1]}"]
    ours = resample_pos_embed(arrays["posemb_in"], grid, num_prefix_tokens=1)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours[:, :1], arrays["posemb_in"][:, :1])  # cls kept as is
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)


def test_original_deit_checkpoint_wrapped_in_model_key():
    """facebookresearch/deit checkpoints are {'model': state_dict, ...}."""
    sd, arrays, name, overrides = load_fixture("deit")
    variables = from_timm({"model": sd, "epoch": np.asarray(300)}, name, **overrides)
    assert_logits_close(logits_of(name, overrides, variables, arrays["x"]), arrays["logits"], "wrapped")


def _original_pvt_key(key: str) -> str:
    """timm PVTv2 key -> whai362/PVT key (the inverse of timm's checkpoint_filter_fn)."""
    key = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.", key)
    key = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"patch_embed{int(m[1]) + 1}.", key)
    key = re.sub(r"^stages\.(\d+)\.norm\.", lambda m: f"norm{int(m[1]) + 1}.", key)
    key = re.sub(r"^patch_embed\.", "patch_embed1.", key)
    return key.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")


def test_original_pvt_key_names_convert():
    sd, arrays, name, overrides = load_fixture("pvt_v2")
    original = {_original_pvt_key(k): v for k, v in sd.items()}
    assert "block1.0.attn.sr.weight" in original and "patch_embed2.proj.weight" in original
    variables = from_timm(original, name, **overrides)
    assert_logits_close(logits_of(name, overrides, variables, arrays["x"]), arrays["logits"], "orig")


def test_timm_model_name_is_accepted():
    sd, arrays, _, overrides = load_fixture("deit")
    variables = from_timm(sd, "deit_tiny_patch16_224", **overrides)
    assert_logits_close(logits_of("deit_tiny", overrides, variables, arrays["x"]), arrays["logits"], "name")


def test_unwrap_state_dict_prefers_ema_and_strips_module_prefix():
    a, b = np.zeros(1), np.ones(1)
    assert unwrap_state_dict({"state_dict": {"w": a}, "state_dict_ema": {"w": b}})["w"] is b
    assert list(unwrap_state_dict({"state_dict": {"module.w": a, "module.v": b}})) == ["w", "v"]


# --------------------------------------------------------------------------------------------
# Errors.


def test_missing_unexpected_and_misshaped_keys_reported_in_one_error():
    sd, _, name, overrides = load_fixture("deit")
    sd = dict(sd)
    del sd["norm.weight"]
    sd["blocks.0.attn.extra.weight"] = np.zeros((3, 3), np.float32)
    sd["head.weight"] = sd["head.weight"][:7]  # 7 classes instead of 10
    with pytest.raises(ConversionError) as info:
        from_timm(sd, name, **overrides)
    msg = str(info.value)
    assert "missing variables: params/norm/scale" in msg
    assert "params/head/kernel (48, 7) vs model (48, 10)" in msg
    assert "unused checkpoint keys: blocks.0.attn.extra.weight" in msg
    assert "\n" not in msg


def test_wrong_family_checkpoint_is_rejected():
    sd, _, _, _ = load_fixture("pvt_v2")
    with pytest.raises(ConversionError, match="missing variables: .*unused checkpoint keys: patch_embed.norm.bias"):
        from_timm(sd, "deit_tiny", img_size=64, depth=2, embed_dim=48, num_heads=3, num_classes=10)


def test_hal_model_has_no_timm_conversion():
    with pytest.raises(ConversionError, match="no timm counterpart.*'deit_small'"):
        from_timm({}, "deit_small_hal")


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ValueError, match="Did you mean: .*pvt_v2_b1"):
        from_timm({}, "pvt_v2_bl")


# --------------------------------------------------------------------------------------------
# CLI and checkpoint I/O.


def _write_safetensors(sd, path):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)


def _cli(*args) -> int:
    return cli_main(["timm", *map(str, args)])


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def _set_args(overrides) -> list[str]:
    """Architecture overrides as CLI `--set FIELD=VALUE` arguments."""
    args = []
    for k, v in overrides.items():
        args += ["--set", f"{k}={tuple(v) if isinstance(v, list) else v!r}"]
    return args


def load_variables(path):
    """(variables, card) of a converted directory, read by the package's one reader."""
    ckpt = read_checkpoint(path)
    return ckpt.variables, ckpt.card


def test_save_load_variables_roundtrip(tmp_path):
    sd, arrays, name, overrides = load_fixture("deit")
    variables = from_timm(sd, name, **overrides)
    out = save_variables(tmp_path / "out", variables, {"model": name, "overrides": overrides})
    assert sorted(os.listdir(out)) == ["model_card.json", "variables"]
    restored, card = load_variables(out)
    assert card == {"model": name, "overrides": overrides}
    a, b = _flat(variables), _flat(restored)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert_logits_close(logits_of(name, overrides, restored, arrays["x"]), arrays["logits"], "restored")


def test_cli_safetensors_to_orbax_and_refuses_nonempty_output(tmp_path, capsys):
    sd, arrays, name, overrides = load_fixture("pvt_v2")
    src = tmp_path / "pvt.safetensors"
    _write_safetensors(sd, src)
    out = tmp_path / "converted"
    argv = ["--model", name, "--input", src, "--output", out, *_set_args(overrides)]
    assert _cli(*argv) == 0, capsys.readouterr().err
    assert (out / "variables").is_dir() and (out / "model_card.json").is_file()
    restored, card = load_variables(out)
    assert card["model"] == name and card["source"]["file"] == "pvt.safetensors"
    card_overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in card["overrides"].items()}
    assert card_overrides == {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    assert_logits_close(logits_of(name, overrides, restored, arrays["x"]), arrays["logits"], "cli")

    before = sorted(os.listdir(tmp_path))
    mtime = os.path.getmtime(out / "model_card.json")
    capsys.readouterr()
    assert _cli(*argv) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == before
    assert os.path.getmtime(out / "model_card.json") == mtime

    assert _cli(*argv, "--overwrite") == 0
    assert sorted(os.listdir(tmp_path)) == before  # replaced in place, no temporary leftovers


def test_cli_reads_torch_pth(tmp_path):
    torch = pytest.importorskip("torch")
    sd, arrays, name, overrides = load_fixture("deit")
    src = tmp_path / "deit.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, src)
    out = tmp_path / "converted"
    assert _cli("--model", name, "--input", src, "--output", out, *_set_args(overrides)) == 0
    restored, card = load_variables(out / "variables")
    assert card["input"]["input_size"] == 64 and card["overrides"]["img_size"] == 64
    assert_logits_close(logits_of(name, overrides, restored, arrays["x"]), arrays["logits"], "pth")


def test_cli_failure_leaves_no_output(tmp_path, capsys):
    sd, _, name, overrides = load_fixture("pvt_v2")
    sd = {k: v for k, v in sd.items() if not k.startswith("stages.3.blocks.0.mlp.fc2")}
    src = tmp_path / "broken.safetensors"
    _write_safetensors(sd, src)
    out = tmp_path / "converted"
    assert _cli("--model", name, "--input", src, "--output", out, *_set_args(overrides)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Checkpoint does not match") and err.count("\n") == 1
    assert "missing variables: params/stages_3/blocks_0/mlp/fc2/bias" in err
    assert sorted(os.listdir(tmp_path)) == ["broken.safetensors"]

    assert _cli("--model", name, "--input", tmp_path / "absent.pth", "--output", out) == 1
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    assert _cli("--model", name, "--input", src, "--output", out, "--set", "depth=2") == 1
    assert "Bad model override" in capsys.readouterr().err and not out.exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's aborted async save
def test_save_failure_while_writing_leaves_nothing(tmp_path):
    """A leaf orbax cannot serialize fails inside the write: no out_dir, no temp sibling."""
    bad = {"params": {"w": np.zeros(3, np.float32), "s": np.array(["x"], dtype=object)}}
    with pytest.raises(ValueError, match="object"):
        save_variables(tmp_path / "out", bad, {"model": "x"})
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # ~10 s: a python -m subprocess
def test_cli_module_entry_point(tmp_path):
    """`python -m halluvit_jax.convert timm ...` as a user runs it."""
    sd, _, name, overrides = load_fixture("pvt_v2")
    src = tmp_path / "pvt.safetensors"
    _write_safetensors(sd, src)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "halluvit_jax.convert", "timm", "--model", name,
           "--input", str(src), "--output", str(tmp_path / "o"), *_set_args(overrides)]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr[-2000:]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 1 and again.stderr.strip().startswith("error: Output directory")


# --------------------------------------------------------------------------------------------
# Full-size parity against timm itself (needs torch + timm; random init, nothing downloaded).


def _timm():
    pytest.importorskip("torch")
    from timm_import import import_timm

    try:
        return import_timm()
    except ImportError as err:
        pytest.skip(f"timm unavailable: {err}")


def _perturbed_timm_model(timm, name, seed=0, **kwargs):
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # move LN affines / biases off 1/0 so their mapping matters
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or (p.ndim == 1 and "norm" in pname):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _timm_logits(model, x_nhwc):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.timm
@pytest.mark.parametrize("name,timm_name", [("deit_small", "deit_small_patch16_224"), ("pvt_v2_b1", "pvt_v2_b1")])
def test_full_size_parity_with_timm(name, timm_name):
    timm = _timm()
    model = _perturbed_timm_model(timm, timm_name)
    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    ref = _timm_logits(model, x)
    variables = from_timm(model.state_dict(), name)  # torch tensors straight in
    err = assert_logits_close(logits_of(name, {}, variables, x), ref, name)
    print(f"{name}: max abs logit diff {err:.3g} (max |logit| {np.abs(ref).max():.3g})")


@pytest.mark.timm
def test_deit_tiny_384_from_224_checkpoint_matches_timm():
    timm = _timm()
    from timm.models.vision_transformer import checkpoint_filter_fn

    m224 = _perturbed_timm_model(timm, "deit_tiny_patch16_224")
    m384 = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=384).eval()
    m384.load_state_dict(checkpoint_filter_fn(m224.state_dict(), m384))
    x = np.random.default_rng(1).standard_normal((1, 384, 384, 3)).astype(np.float32)
    ref = _timm_logits(m384, x)
    variables = from_timm(m224.state_dict(), "deit_tiny", img_size=384)
    err = assert_logits_close(logits_of("deit_tiny", {"img_size": 384}, variables, x), ref, "deit_tiny@384")
    print(f"deit_tiny@384 from 224: max abs logit diff {err:.3g}")
