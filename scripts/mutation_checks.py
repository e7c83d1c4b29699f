"""Shows that the lowering, reference and reliability tests can fail: each mutation below breaks
one thing on a copy of the tracked tree, and the tests named with it must then fail.

A test that passes whatever the code does proves nothing. For every check that guards a claim
the docs make (the accelerator path is the plain math; the references are independent of the
code; a damaged or non-finite checkpoint is refused), this script makes the mistake the check
exists for in a throwaway copy (``git archive HEAD``, so your work tree is never touched), runs
only the named tests there, and reports whether they failed as they must::

    python scripts/mutation_checks.py                       # every mutation (~15 min on 2 cores)
    python scripts/mutation_checks.py --only forget_impl    # one
    python scripts/mutation_checks.py --list
    python scripts/mutation_checks.py --json benchmarks/results/mutations.json

Exit 0 when every mutation is caught (its tests fail), 1 when one survives. tests/
test_mutation_checks.py keeps the list honest in the fast tier: every ``old`` text still occurs
exactly once in its file, and every named test still exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    why: str  # the mistake, in words
    path: str  # file changed, relative to the repository root
    old: str  # text that occurs exactly once in it
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail


MUTATIONS = (
    Mutation(
        "forget_impl", "the models' FFN is built without impl= (so it runs 'auto' whatever the model asks)",
        "halluvit_jax/models/common.py",
        "name=name,\n                        **kwargs, **self._common())",
        "name=name,\n                        **kwargs, dtype=self.dtype, param_dtype=self.param_dtype)",
        ("tests/test_lowering.py::test_auto_lowers_to_the_platforms_impl_on_accelerators[deit_tiny_hal]",),
    ),
    Mutation(
        "fused_on_accelerators", "impl='auto' picks the fused CPU kernels on TPU and GPU too",
        "halluvit_jax/layers/config.py",
        'AUTO = {"cpu": "fused", "cuda": "accel", "tpu": "accel"}',
        'AUTO = {"cpu": "fused", "tpu": "fused", "cuda": "fused", "rocm": "fused"}',
        ("tests/test_lowering.py::test_auto_lowers_to_the_platforms_impl_on_accelerators[deit_tiny_hal]",),
    ),
    Mutation(
        "accel_not_wired", "HalAttention drops its accel core (impl='accel', auto on CUDA and TPU, runs plain)",
        "halluvit_jax/layers/attention.py",
        "widths, train, accel=accel, pallas=pallas)",
        "widths, train, pallas=pallas)",
        ("tests/test_hmhsa_accel.py::test_hal_attention_with_impl_accel_matches_plain[deit]",
         "tests/test_lowering.py::test_auto_lowers_to_the_platforms_impl_on_accelerators[deit_tiny_hal]"),
    ),
    Mutation(
        "ihh_convolution_not_correlation", "IHH flips its kernel (convolution where PyTorch correlates)",
        "halluvit_jax/layers/attention.py",
        "maps, kernel[:, None].astype(maps.dtype)",
        "maps, kernel[:, None, ::-1, ::-1].astype(maps.dtype)",
        ("tests/test_conv_layers.py::test_ihh_with_class_token_matches_the_reference",
         "tests/test_layers.py::test_hal_attention_matches_numpy_reference"),
    ),
    Mutation(
        "fused_softmax_backward", "the fused attention's backward pass rebuilds unnormalized maps",
        "halluvit_jax/layers/fused/attention.py",
        "lse = row_max + jnp.log(row_sum)",
        "lse = row_max",
        ("tests/test_fused_layers.py::test_attention_core_values_and_grads_match_the_reference",),
    ),
    Mutation(
        "resume_unchecked", "resume takes a checkpoint's state without checking it is finite",
        "halluvit_jax/train/checkpointing.py",
        "if not bool(jax.device_get(jax.jit(all_finite)(state))):",
        "if False:",
        ("tests/test_reliability_pieces.py::test_resume_refuses_a_checkpoint_whose_optimizer_state_is_not_finite",),
    ),
    Mutation(
        "guard_ignores_grad_norm", "the non-finite guard looks at the loss only",
        "halluvit_jax/train/trainer.py",
        'if float(metrics["finite"]) == 1.0:',
        'if math.isfinite(float(metrics["loss"])):',
        ("tests/test_reliability_pieces.py::test_non_finite_gradient_norm_with_a_finite_loss_stops_the_run_unsaved",),
    ),
    Mutation(
        "no_checksums", "reads skip the checksums saved with each step",
        "halluvit_jax/checkpoint/io.py",
        "    _check_checksums(saved_checksums(root, step), found, root, step)",
        "    pass",
        ("tests/test_reliability_pieces.py::test_damaged_array_file_in_the_newest_step[byte_flipped]",),
    ),
    # No mutation removes quiet_reads' log filter: with the orbax the project pins (0.11.36) a
    # damaged step's reads log nothing the filter drops (checked: evaluate and a resume print the
    # same without it), so that mutation is equivalent here. The filter stays for the orbax 0.12
    # line, where the 82,090 lines of issue 22 were met. The late wake-ups below are what is left.
    Mutation(
        "late_wakeups", "a closed read loop raises on TensorStore's late wake-ups (the traceback they print)",
        "halluvit_jax/checkpoint/io.py",
        "    def call_soon_threadsafe(self, callback, *args, context=None):",
        "    def call_soon_threadsafe_unused(self, callback, *args, context=None):",
        ("tests/test_reliability_pieces.py::test_a_closed_read_loop_ignores_late_wakeups",),
    ),
)


def _copy_tree(dest: str) -> None:
    """The tracked files at HEAD plus their uncommitted changes (``git stash create``)."""
    rev = subprocess.run(["git", "-C", ROOT, "stash", "create"], capture_output=True, text=True,
                         check=True).stdout.strip() or "HEAD"
    data = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")


def apply(mutation: Mutation, root: str) -> None:
    path = os.path.join(root, mutation.path)
    with open(path) as f:
        text = f.read()
    if text.count(mutation.old) != 1:
        raise ValueError(f"{mutation.name}: the text to change occurs {text.count(mutation.old)} times "
                         f"in {mutation.path} (expected once): update MUTATIONS")
    with open(path, "w") as f:
        f.write(text.replace(mutation.old, mutation.new))


def run(mutation: Mutation, timeout: int) -> dict:
    """Applies ``mutation`` to a fresh copy and runs its tests there (every marker)."""
    with tempfile.TemporaryDirectory(prefix=f"mutation-{mutation.name}-") as tmp:
        _copy_tree(tmp)
        apply(mutation, tmp)
        env = {**os.environ, "PYTHONPATH": tmp, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
               "-x", *mutation.tests]
        start = time.time()
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            rc, out = None, "timed out"
        failed = [line.split(" ", 2)[1] for line in out.splitlines() if line.startswith("FAILED ")]
        summary = next((line for line in reversed(out.splitlines()) if " in " in line and "=" not in line[:1]),
                       out.strip().splitlines()[-1] if out.strip() else "")
        return {"name": mutation.name, "why": mutation.why, "path": mutation.path, "tests": list(mutation.tests),
                "exit": rc, "caught": rc == 1 and bool(failed), "failed": failed,
                "first_error": next((line for line in out.splitlines() if line.startswith("E ")), ""),
                "summary": summary.strip("= "), "seconds": round(time.time() - start, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per mutation")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.why} ({m.path}) -> {', '.join(m.tests)}")
        return 0
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"error: unknown mutation {sorted(unknown)}; see --list", file=sys.stderr)
        return 2
    results = []
    for m in chosen:
        r = run(m, args.timeout)
        results.append(r)
        print(f"{'caught' if r['caught'] else 'SURVIVED'}: {m.name} ({r['seconds']} s): {r['summary']}", flush=True)
        if r["first_error"]:
            print(f"    {r['first_error'][:200]}", flush=True)
    if args.json:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import run_info

        report = run_info.header("mutation_checks", __file__, argv)
        report["results"] = results
        run_info.write_json(args.json, report)
    survived = [r["name"] for r in results if not r["caught"]]
    if survived:
        print(f"error: mutations not caught by their tests: {', '.join(survived)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
