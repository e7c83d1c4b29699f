"""The classification trainer: ``train_and_evaluate(config, workdir)``.

One function in banner sections (big_vision style): plan, model and optimizer, shard and jit,
restore or init, loop. The pieces it composes live by concern:

* ``train/steps.py``: :class:`~halluvit_jax.train.steps.TrainState`, the loss and its targets,
  ``train_step`` / ``eval_step`` (pure, jit-able);
* ``train/evaluation.py``: the evaluation loop; ``train/metrics.py``: metrics files, progress;
* ``train/checkpointing.py``: save, resume (a corrupt newest step is set aside), ``init_from``;
* ``train/sharding.py``: the mesh and the shardings; ``train/optim.py``: schedule and optimizer;
* ``data/``: the input pipeline (``pipeline.fit_splits``, ``demo.prepare_if_missing``).

Everything is ``jax.jit`` with explicit shardings over a ('data', 'fsdp', 'model') mesh; the
same code runs on one CPU and on a multi-host TPU pod. Determinism: the per-step RNG is
``fold_in(seed_rng, step)``, the input iterator state is checkpointed with the train state, so a
resumed run is bitwise identical to an uninterrupted one on the same devices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from halluvit_jax.cli import Interrupted, UsageError, UserError, clause
from halluvit_jax.data import demo, pipeline
from halluvit_jax.train import checkpointing, optim, sharding
from halluvit_jax.train.evaluation import evaluate_state
from halluvit_jax.train.metrics import MetricWriter, Progress, final_metrics, truncate_metrics, write_final_metrics
from halluvit_jax.train.steps import (
    TrainState,
    create_model,
    create_train_state,
    eval_step,
    make_targets_fn,
    mean_std_of,
    train_step,
)

logger = logging.getLogger("halluvit_jax.train")


# ---------------------------------------------------------------------------------------------
# Helpers of the loop.


def resolve_steps(config: ml_collections.ConfigDict, name: str, steps_per_epoch: int, default=None):
    """A duration given as ``{name}_steps`` or ``{name}_epochs`` -> steps (steps win if both are set)."""
    steps = config.get(f"{name}_steps")
    epochs = config.get(f"{name}_epochs")
    if steps is not None:  # steps win, so `--config.total_steps=N` overrides a preset's epochs
        return int(steps)
    if epochs is not None:
        return max(int(round(float(epochs) * steps_per_epoch)), 0 if name == "warmup" else 1)
    return default


def _periodic(step: int, every: int | None, total: int) -> bool:
    return bool(every) and every > 0 and (step % every == 0 or step == total)


class _Preemption:
    """SIGTERM and SIGINT (Ctrl-C) set a flag; the loop checkpoints and stops at the next step
    boundary. A second Ctrl-C interrupts at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.debug("%s received: saving a checkpoint and stopping at the next step.",
                       signal.Signals(signum).name)
        self.requested = True
        self.signum = signum

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            # All hosts must agree on the step at which they save; JAX's coordination service
            # sees the preemption notice on every host and picks a common step.
            try:
                return self.requested or multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:
                return False
        return self.requested

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class TrainingDiverged(UserError, FloatingPointError):
    """A step produced a non-finite loss, gradient or state; nothing of it was saved (exit 1)."""


def _check_finite(metrics: dict[str, Any], step: int, manager) -> None:
    """Raises :class:`TrainingDiverged` if step ``step`` made anything that a checkpoint holds
    (loss, gradients, parameters, BatchNorm statistics, optimizer state, EMA) non-finite.

    Called before a step is checkpointed, so a non-finite state is never saved.
    """
    if float(metrics["finite"]) == 1.0:
        return
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    manager.wait_until_finished()
    latest = manager.latest_step()
    where = os.fspath(manager.directory)
    last = (f"the last finite checkpoint is step {latest} ({where}/{latest}), kept as it was"
            if latest is not None else "there is no checkpoint yet")
    what = ("loss" if not math.isfinite(loss) else "gradient" if not math.isfinite(grad_norm)
            else "parameters / BatchNorm statistics / optimizer state")
    raise TrainingDiverged(
        f"Non-finite {what} (loss {loss}, grad norm {grad_norm}) at step {step}; stopped without saving it; "
        f"{last}; lower optim.lr or set optim.grad_clip_norm (e.g. --config.optim.grad_clip_norm=1.0)"
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """The run in numbers: batch, classes, steps and the periods (in steps) of its events."""

    batch_size: int
    num_classes: int
    num_train: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int | None
    ckpt_every: int | None
    keep_every: int | None
    log_every: int


def make_plan(config: ml_collections.ConfigDict, input_cfg: ml_collections.ConfigDict, mesh) -> Plan:
    """The :class:`Plan` of ``config`` on ``input_cfg``'s dataset (one line when it cannot run)."""
    batch_size = int(config.global_batch_size)
    dp = sharding.data_parallel_size(mesh)
    if batch_size % dp or batch_size % jax.process_count():
        raise UserError(
            f"global_batch_size={batch_size} must be divisible by the data-parallel size "
            f"{dp} (mesh data x fsdp) and the process count {jax.process_count()}; change "
            "--config.global_batch_size or --config.mesh"
        )
    num_train = int(pipeline.num_examples(input_cfg, input_cfg.train_split))
    steps_per_epoch = max(num_train // batch_size, 1)
    total_steps = resolve_steps(config, "total", steps_per_epoch)
    if total_steps is None:
        raise UserError("neither total_steps nor total_epochs is set; pass --config.total_steps=N")
    return Plan(batch_size=batch_size, num_classes=int(pipeline.num_classes(input_cfg)), num_train=num_train,
                steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                warmup_steps=resolve_steps(config.optim, "warmup", steps_per_epoch, default=0),
                eval_every=resolve_steps(config, "eval_every", steps_per_epoch),
                ckpt_every=resolve_steps(config, "checkpoint_every", steps_per_epoch),
                keep_every=resolve_steps(config, "keep_every", steps_per_epoch),
                log_every=int(config.get("log_every_steps", 50)))


def model_error(config: ml_collections.ConfigDict, err: Exception) -> UserError:
    """The one line for a model that ``config`` cannot build."""
    return UserError(f"cannot build {config.model_name} with config.model {dict(config.get('model') or {})}: "
                     f"{clause(err)}; fix --config.model_name / --config.model.*")


def _log_train(writer: MetricWriter, train_metrics: list[dict[str, Any]], step: int, plan: Plan,
               progress: Progress) -> None:
    """Writes the mean train metrics since the last log line, and logs that line."""
    host = jax.device_get(train_metrics)
    summary = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0] if k != "finite"}
    line, img_s = progress.line(step, {"loss": summary["train/loss"], "lr": summary["train/lr"]})
    if math.isfinite(img_s):
        summary["train/images_per_sec"] = img_s
    summary["train/epoch"] = step / plan.steps_per_epoch
    writer.write(step, summary)
    logger.info(line)


def _evaluate_and_log(evaluate: Any, state: TrainState, writer: MetricWriter, step: int, *,
                      final: bool = False) -> dict[str, float]:
    t0 = time.perf_counter()
    results = evaluate(state)
    writer.write(step, results)
    if final:
        logger.info("final eval: %s", results)
    else:
        logger.info("step %d eval: %s (%.1fs)", step, ", ".join(f"{k} {v:.4f}" for k, v in results.items()),
                    time.perf_counter() - t0)
    return results


def _log_parameters(name: str, params: Any, shardings: Any, mesh) -> None:
    """The parameter count; the largest leaves and their shardings (INFO on several devices)."""
    logger.info("Model %s: %.2fM parameters.", name, sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)) / 1e6)
    level = logging.INFO if mesh.devices.size > 1 else logging.DEBUG
    if logger.isEnabledFor(level):
        logger.log(level, "Largest leaves and their shardings:\n%s", sharding.describe(shardings, params, max_lines=12))


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What the trainer compiles for training, built by :func:`build_train_program`."""

    tx: Any
    learning_rate_fn: Any
    init_fn: Any  # rng -> TrainState
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs carrying ``state_shardings``
    train_step: Any  # jitted (state, batch, rng) -> (state, metrics); the state is donated
    ema_decay: float


def build_train_program(config: ml_collections.ConfigDict, model: Any, mesh, *, input_cfg: ml_collections.ConfigDict,
                        num_classes: int, batch_size: int, total_steps: int, warmup_steps: int) -> TrainProgram:
    """The optimizer, the state's shardings and the jitted train step of ``config`` on ``mesh``:
    what ``train_and_evaluate`` runs and ``python -m halluvit_jax.aot`` compiles for a TPU."""
    learning_rate_fn = optim.learning_rate_fn_of(config.optim, batch_size, total_steps, warmup_steps)
    tx = optim.create_optimizer(config.optim, learning_rate_fn)
    ema_decay = float(config.get("ema_decay", 0.0) or 0.0)
    image_size = int(input_cfg.image_size)
    init_fn = functools.partial(create_train_state, model=model, tx=tx, image_size=image_size, use_ema=ema_decay > 0)
    try:
        abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
    except (ValueError, TypeError) as err:  # e.g. odd hMHSA heads, an unknown model field
        raise model_error(config, err) from None
    state_sh = sharding.infer_shardings(abstract_state, mesh, rules=[tuple(r) for r in config.get("sharding_rules", ())],
                                        fsdp_min_size=int(config.get("fsdp_min_size", 2**14)),
                                        logical_axes=sharding.logical_axes(model, image_size))
    abstract_state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                            abstract_state, state_sh)
    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    step = jax.jit(
        sharding.with_axis_rules(mesh, functools.partial(
            train_step, apply_fn=model.apply, tx=tx, targets_fn=make_targets_fn(input_cfg, num_classes),
            learning_rate_fn=learning_rate_fn, ema_decay=ema_decay,
            grad_accum_steps=int(config.optim.get("grad_accum_steps", 1)))),
        in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl), donate_argnums=(0,))
    return TrainProgram(tx=tx, learning_rate_fn=learning_rate_fn, init_fn=init_fn, state_shardings=state_sh,
                        abstract_state=abstract_state, train_step=step, ema_decay=ema_decay)


def _jit_evaluate(plan: Plan, input_cfg: ml_collections.ConfigDict, model: Any, state_sh: Any, mesh,
                  ema: bool) -> Any:
    """``evaluate(state)``: :func:`~halluvit_jax.train.evaluation.evaluate_state` with the jitted eval step."""
    jit_eval_step = jax.jit(
        sharding.with_axis_rules(mesh, functools.partial(eval_step, apply_fn=model.apply, mean_std=mean_std_of(input_cfg))),
        in_shardings=(state_sh.params, state_sh.batch_stats, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh))
    return functools.partial(evaluate_state, jit_eval_step, input_cfg=input_cfg, global_batch_size=plan.batch_size,
                             mesh=mesh, ema=ema)


def _already_finished(workdir: str, start_step: int, total_steps: int) -> None:
    final = final_metrics(workdir)
    logger.info("Already finished: the checkpoint in %s is at step %d of %d; nothing to train. Final metrics: %s",
                workdir, start_step, total_steps,
                ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "step") or "none recorded")


# ---------------------------------------------------------------------------------------------
# train_and_evaluate.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config.model_name`` on ``config.input``, evaluating and checkpointing into ``workdir``.

    Resumes from the latest checkpoint in ``workdir`` if there is one, else starts from
    ``config.init_from`` (converted or training checkpoint) if set, else from scratch.
    Returns the final train state.
    """
    # ---- Plan: processes, mesh, input, step counts. -------------------------------------------
    if config.get("distributed", False) and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    workdir = os.path.abspath(workdir)
    mesh = sharding.create_mesh(config.get("mesh", {}))
    logger.info("Process %d/%d, %d devices, mesh %s.", jax.process_index(), jax.process_count(),
                jax.device_count(), dict(mesh.shape))
    choice = str(config.get("mesh", {}).get("partitioner", "auto"))
    try:
        partitioner = sharding.partitioner_for(mesh, choice)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if choice == "auto" and partitioner == "gspmd" and jax.config.jax_use_shardy_partitioner:
        logger.info("Partitioner: GSPMD (the mesh splits both fsdp and model, where Shardy computed "
                    "wrong values with jax 0.10.2; --config.mesh.partitioner=shardy overrides).")
    with sharding.use_partitioner(partitioner):
        return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh) -> TrainState:
    """`train_and_evaluate` on ``mesh``, under the partitioner it chose."""
    if config.get("prepare_demo", False):
        demo.prepare_if_missing(config.input)
    input_cfg = pipeline.fit_splits(config.input)
    plan = make_plan(config, input_cfg, mesh)
    train_iter = pipeline.create_train_iter(input_cfg, global_batch_size=plan.batch_size, seed=int(config.seed))
    logger.info("%d train examples, %d steps/epoch, %d steps (%.1f epochs), %d classes.", plan.num_train,
                plan.steps_per_epoch, plan.total_steps, plan.total_steps / plan.steps_per_epoch, plan.num_classes)

    # ---- Model, optimizer, shard and jit: parameters and optimizer state are born sharded. -----
    try:
        model = create_model(config, plan.num_classes)
    except (ValueError, TypeError) as err:  # an unknown model name or field
        raise model_error(config, err) from None
    program = build_train_program(config, model, mesh, input_cfg=input_cfg, num_classes=plan.num_classes,
                                  batch_size=plan.batch_size, total_steps=plan.total_steps,
                                  warmup_steps=plan.warmup_steps)
    state_sh, ema_decay = program.state_shardings, program.ema_decay
    _log_parameters(config.model_name, program.abstract_state.params, state_sh.params, mesh)
    evaluate = _jit_evaluate(plan, input_cfg, model, state_sh, mesh, ema=ema_decay > 0)
    init_rng, train_rng = jax.random.split(jax.random.key(int(config.seed)))

    # ---- Restore or init: the workdir's newest intact step, else init_from, else scratch. -----
    manager = checkpointing.create_checkpoint_manager(
        os.path.join(workdir, "checkpoints"), max_to_keep=int(config.get("keep_checkpoints", 3)),
        keep_period=plan.keep_every, async_save=bool(config.get("async_checkpointing", True)))
    state = checkpointing.restore_latest(manager, program.abstract_state, train_iter)
    if state is None:  # a fresh run
        state = jax.jit(program.init_fn, out_shardings=state_sh)(init_rng)
        if config.get("init_from"):
            state = checkpointing.init_from(state, config.init_from, tx=program.tx, shardings=state_sh,
                                            reinit_regex=config.get("init_reinit_regex"), use_ema=ema_decay > 0)
    start_step = int(jax.device_get(state.step))
    checkpointing.save_config(config, workdir)  # after the restore: a config that does not fit never replaces it
    if start_step >= plan.total_steps:
        manager.close()
        _already_finished(workdir, start_step, plan.total_steps)
        return state

    # ---- Loop: step, check finiteness one step behind, log, checkpoint, evaluate. -------------
    truncate_metrics(workdir, start_step)
    writer = MetricWriter(workdir, tensorboard=bool(config.get("tensorboard", True)))
    if start_step == 0:
        writer.write_text("config", "```\n" + str(config) + "\n```")
    progress, preemption = Progress(plan.total_steps, plan.batch_size, start_step), _Preemption()
    train_metrics: list[dict[str, jax.Array]] = []
    pending: tuple[int, dict] | None = None  # (step, metrics) not yet checked for finiteness
    last_eval: dict[str, float] = {}
    step = start_step
    logger.info("Training from step %d to %d.", start_step, plan.total_steps)
    try:
        while step < plan.total_steps:
            state, metrics = program.train_step(state, sharding.shard_batch(next(train_iter), mesh), train_rng)
            step += 1
            if step == start_step + 1:  # compiled: time (and ETA) from here on
                jax.block_until_ready(metrics["loss"])
                progress.start(step)
            train_metrics.append(metrics)
            if pending is not None:  # the previous step's, while this one runs (no pipeline stall)
                _check_finite(pending[1], pending[0], manager)
            pending = (step, metrics)
            if step % plan.log_every == 0 or step == plan.total_steps:
                _check_finite(metrics, step, manager)
                pending = None
                _log_train(writer, train_metrics, step, plan, progress)
                train_metrics = []
            stop = preemption.should_stop(step)
            if _periodic(step, plan.ckpt_every, plan.total_steps) or stop or step == plan.total_steps:
                if pending is not None:
                    _check_finite(pending[1], step, manager)
                    pending = None
                checkpointing.save(manager, step, state, train_iter)
            if _periodic(step, plan.eval_every, plan.total_steps):
                last_eval = _evaluate_and_log(evaluate, state, writer, step)
            if stop:
                logger.warning("Preempted at step %d; checkpoint saved, exiting.", step)
                break
        if pending is not None:
            _check_finite(pending[1], pending[0], manager)
        if step == plan.total_steps and plan.eval_every is None:  # eval_every_steps=-1: only at the end
            last_eval = _evaluate_and_log(evaluate, state, writer, step, final=True)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        preemption.restore()
    if step == plan.total_steps:
        write_final_metrics(workdir, step, last_eval)
    if preemption.signum == signal.SIGINT:
        raise Interrupted("")  # the log line above said it; exit status 130
    return state
