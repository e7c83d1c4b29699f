"""Logit parity with timm: the largest difference of each comparison tests/test_convert_timm.py makes.

The tests assert each difference is under a tolerance; this script records how far under, with
the same inputs, models and helpers (imported from the test module, not copied):

- the reduced golden fixtures (``tests/golden/{deit,pvt_v2}.npz``: timm's logits stored beside
  the state_dict, no torch needed), the DeiT fixture at 96 px (pos_embed resampled 4x4 -> 6x6)
  and ``resample_pos_embed`` against timm's ``resample_abs_pos_embed`` on three grids;
- with torch + timm installed (``pip install .[timm]``), the full-size comparisons of the
  ``timm``-marked tests: randomly initialized, perturbed timm models (nothing downloaded).

    python benchmarks/parity.py --json benchmarks/results/parity.json
    python benchmarks/parity.py --no-timm      # the fixture comparisons only
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_info  # noqa: E402

LOGIT_TOL = "max abs diff < 1e-4 * max(1, max |logit|)"  # tests/test_convert_timm.py: assert_logits_close


def _logit_row(check: str, test: str, ours, ref) -> dict:
    import numpy as np

    ours, ref = np.asarray(ours), np.asarray(ref)
    err, peak = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    return {"check": check, "test": test, "max_abs_diff": err, "max_abs_ref": peak,
            "tolerance": 1e-4 * max(1.0, peak), "tolerance_rule": LOGIT_TOL}


def fixture_rows() -> list[dict]:
    import numpy as np

    import test_convert_timm as t

    rows = []
    for family, what in (("deit", "reduced DeiT fixture (`deit.npz`: 48 wide, 3 heads, depth 2, 64 px)"),
                         ("pvt_v2", "reduced PVTv2 fixture (`pvt_v2.npz`: dims (16,32,40,64), depths 1, 72x64 px)")):
        sd, arrays, name, overrides = t.load_fixture(family)
        variables = t.from_timm(sd, name, **overrides)
        rows.append(_logit_row(what, "test_reduced_fixture_logits_match_timm",
                               t.logits_of(name, overrides, variables, arrays["x"]), arrays["logits"]))
        if family == "deit":
            o96 = dict(overrides, img_size=96)
            v96 = t.from_timm(sd, name, **o96)
            rows.append(_logit_row("same checkpoint in a 96 px model (pos_embed 4x4 -> 6x6)",
                                   "test_deit_pos_embed_resampled_to_new_resolution_matches_timm",
                                   t.logits_of(name, o96, v96, arrays["x_96"]), arrays["logits_96"]))
            for grid in ((24, 24), (10, 10), (7, 9)):
                ref = arrays[f"posemb_{grid[0]}x{grid[1]}"]
                ours = np.asarray(t.resample_pos_embed(arrays["posemb_in"], grid, num_prefix_tokens=1))
                rows.append({"check": f"`resample_pos_embed` vs timm's `resample_abs_pos_embed`, 14x14 -> "
                                      f"{grid[0]}x{grid[1]} (N(0,1) values)",
                             "test": "test_resample_pos_embed_matches_timm",
                             "max_abs_diff": float(np.abs(ours - ref).max()),
                             "max_abs_ref": float(np.abs(ref).max()), "tolerance": 2e-5,
                             "tolerance_rule": "assert_allclose(atol=2e-5, rtol=0)"})
    return rows


def timm_rows() -> list[dict]:
    import numpy as np

    import test_convert_timm as t
    from timm_import import import_timm

    timm = import_timm()
    rows = []
    for name, timm_name in (("deit_small", "deit_small_patch16_224"), ("pvt_v2_b1", "pvt_v2_b1")):
        model = t._perturbed_timm_model(timm, timm_name)
        x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
        ref = t._timm_logits(model, x)
        variables = t.from_timm(model.state_dict(), name)
        rows.append(_logit_row(f"full-size `{name}` at 224", "test_full_size_parity_with_timm",
                               t.logits_of(name, {}, variables, x), ref))
    from timm.models.vision_transformer import checkpoint_filter_fn

    m224 = t._perturbed_timm_model(timm, "deit_tiny_patch16_224")
    m384 = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=384).eval()
    m384.load_state_dict(checkpoint_filter_fn(m224.state_dict(), m384))
    x = np.random.default_rng(1).standard_normal((1, 384, 384, 3)).astype(np.float32)
    variables = t.from_timm(m224.state_dict(), "deit_tiny", img_size=384)
    rows.append(_logit_row("`deit_tiny` at 384 from a 224 checkpoint",
                           "test_deit_tiny_384_from_224_checkpoint_matches_timm",
                           t.logits_of("deit_tiny", {"img_size": 384}, variables, x), t._timm_logits(m384, x)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-timm", action="store_true", help="skip the full-size comparisons (need torch + timm)")
    ap.add_argument("--json", default="", help="also write the results, machine and versions here")
    args = ap.parse_args(argv)
    rows = fixture_rows() + ([] if args.no_timm else timm_rows())
    for r in rows:
        print(f"{r['max_abs_diff']:9.2e} (tolerance {r['tolerance']:.1e})  {r['check']}")
    if args.json:
        import jax

        run_info.write_json(args.json, {
            **run_info.header("parity", __file__, argv, extra=("torch", "timm")),
            "backend": jax.default_backend(), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
