r"""The demo-run figures of the docs: the embedded-digits pipeline, run through the real CLIs.

Runs, each as a subprocess (``sys.executable``) and timed wall-clock, the commands that
docs/training.md (the 60-epoch demo), docs/conversion.md ("Demo figures": baseline, ``convert
hal``, evaluate, fine-tune, from scratch, ``convert deploy`` + evaluate) and README.md / docs/ablations.md
(CCS, paper Table 4, of the demo hal model and of the baseline) quote, and records what the CLIs
themselves wrote: ``final_metrics.json`` and ``metrics.jsonl`` of each training run, the
conversion report in the converted directory's ``model_card.json``, the JSON that ``evaluate``
prints and the JSON of ``analysis ccs --json``. Nothing is re-computed here.
benchmarks/render_docs.py renders the docs' figures from the JSON (kinds ``demo_*``).

    python benchmarks/demo_figures.py --json benchmarks/results/demo.json --workdir /tmp/demo_figures
    python benchmarks/demo_figures.py --quick --workdir /tmp/demo_quick   # smoke test: 1-epoch runs

About 10 minutes of CPU on 2 cores (the 60-epoch demo is half of it); longer on a busy host.
Re-running with the same ``--workdir`` starts over (it deletes the run directories it owns).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_info  # noqa: E402

ROOT = run_info.ROOT
# --quick: every training run is one epoch (eval and checkpoint at its end).
QUICK = ["--config.total_epochs=1", "--config.eval_every_epochs=1", "--config.checkpoint_every_epochs=1"]


def _run(argv: list[str], log: str) -> tuple[float, str]:
    """Run ``python ARGV`` from the repository root; (wall seconds, stdout). Output also goes to ``log``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    with open(log, "w") as f:
        f.write(f"$ python {' '.join(argv)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): python {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT + os.sep) else path


def _train(name: str, config: str, workdir: str, quick: bool, reuse: bool = False) -> dict[str, Any]:
    record = workdir + ".json"
    if reuse and os.path.isfile(record):  # a finished run of an interrupted invocation (--reuse)
        with open(record) as f:
            return json.load(f)
    shutil.rmtree(workdir, ignore_errors=True)
    argv = ["train.py", "--config", config, "--workdir", workdir] + (QUICK if quick else [])
    wall, _ = _run(argv, workdir + ".log")
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rates = [r["train/images_per_sec"] for r in rows
             if isinstance(r.get("train/images_per_sec"), (int, float)) and r["train/images_per_sec"] == r["train/images_per_sec"]]
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = json.load(f)
    out = {"name": name, "command": f"python train.py --config {config} --workdir {_rel(workdir)}",
           "model": cfg.get("model_name"), "epochs": cfg.get("total_epochs"),
           "batch": cfg.get("global_batch_size"), "steps": final["step"], "wall_s": round(wall, 2),
           "top1": final.get("eval/top1"), "top5": final.get("eval/top5"),
           "images_per_sec": {"min": min(rates), "median": statistics.median(rates), "max": max(rates),
                              "logged": len(rates)} if rates else None}
    # An example progress line, the one logged nearest the middle of the run (stderr of train.py).
    with open(workdir + ".log") as f:
        lines = [ln.split("] ", 1)[-1].strip() for ln in f if " | ETA " in ln]
    if lines:
        out["progress_line"] = lines[len(lines) // 2]
    run_info.write_json(record, out)
    return out


def _evaluate(checkpoint: str, log: str) -> tuple[float, dict[str, Any]]:
    wall, stdout = _run(["-m", "halluvit_jax.evaluate", "--config", "configs/demo.py", "--checkpoint", checkpoint], log)
    return wall, json.loads(stdout[stdout.index("{"):])


def _ccs(checkpoint: str, out: str) -> dict[str, Any]:
    wall, _ = _run(["-m", "halluvit_jax.analysis", "ccs", "--checkpoint", checkpoint, "--data", "demo",
                    "--similarity", "--json", out], out + ".log")
    with open(out) as f:
        res = json.load(f)
    return {"command": f"python -m halluvit_jax.analysis ccs --checkpoint {_rel(checkpoint)} --data demo --similarity",
            "model": res["model"], "hal": res["hal"], "num_images": res["num_images"], "ccs": res["ccs"],
            "blocks": [{"block": b["block"], "heads": b["heads"], "score": b["score"],
                        "similarity": b.get("similarity")} for b in res["blocks"]],
            "wall_s": round(wall, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--workdir", default="/tmp/demo_figures", help="where the runs go (their directories are replaced)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1-epoch training runs")
    p.add_argument("--reuse", action="store_true",
                   help="keep the training runs an interrupted invocation finished in --workdir (their record)")
    args = p.parse_args(argv)
    report = run_info.header("demo_figures", __file__, argv)
    report["quick"] = args.quick
    report["reused_runs"] = args.reuse
    w = os.path.abspath(args.workdir)
    os.makedirs(w, exist_ok=True)
    j = lambda name: os.path.join(w, name)  # noqa: E731

    report["demo"] = _train("demo", "configs/demo.py", j("demo"), args.quick, args.reuse)
    base = _train("baseline", "configs/demo_baseline.py", j("demo_baseline"), args.quick, args.reuse)

    shutil.rmtree(j("demo_hal_converted"), ignore_errors=True)
    conv_argv = ["-m", "halluvit_jax.convert", "hal", "--from", j("demo_baseline"), "--model", "deit_tiny_hal",
                 "--calib-config", "configs/demo.py", "--output", j("demo_hal_converted")]
    conv_wall, conv_out = _run(conv_argv, j("convert_hal.log"))
    with open(os.path.join(j("demo_hal_converted"), "model_card.json")) as f:
        card = json.load(f)
    eval_wall, conv_eval = _evaluate(j("demo_hal_converted"), j("evaluate_converted.log"))
    converted = {"name": "converted", "model": card["model"], "steps": 0, "top1": conv_eval.get("top1"),
                 "top5": conv_eval.get("top5"), "wall_s": round(conv_wall, 2), "eval_wall_s": round(eval_wall, 2),
                 "calibration": card.get("calibration"), "report": card["report"], "cli_line": conv_out.strip()}

    ft_config = f"configs/finetune.py:model=demo,init={j('demo_hal_converted')}"
    finetune = _train("finetune", ft_config, j("demo_hal_ft"), args.quick, args.reuse)
    scratch = _train("scratch", "configs/demo.py:ci", j("demo_ci"), args.quick, args.reuse)

    shutil.rmtree(j("demo_hal_deploy"), ignore_errors=True)
    dep_wall, _ = _run(["-m", "halluvit_jax.convert", "deploy", "--checkpoint", j("demo_hal_ft"),
                        "--output", j("demo_hal_deploy")], j("convert_deploy.log"))
    dep_eval_wall, dep_eval = _evaluate(j("demo_hal_deploy"), j("evaluate_deploy.log"))
    deploy = {"name": "deploy", "model": dep_eval.get("model"), "top1": dep_eval.get("top1"),
              "top5": dep_eval.get("top5"), "wall_s": round(dep_wall, 2), "eval_wall_s": round(dep_eval_wall, 2)}
    report["pipeline"] = {"baseline": base, "converted": converted, "finetune": finetune, "scratch": scratch,
                          "deploy": deploy}
    report["ccs"] = {"hal": _ccs(j("demo"), j("ccs_demo.json")),
                     "baseline": _ccs(j("demo_baseline"), j("ccs_baseline.json"))}
    report["machine"]["load_average_end"] = run_info.loadavg()
    text = json.dumps(report, indent=1, default=str)
    if args.json:
        run_info.write_json(args.json, report)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
