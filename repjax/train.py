"""`python -m repjax.train --config configs/<name>.py[:arg] [--config.<key>=<value>] --workdir <dir>`.

One function, read top to bottom: check -> mesh -> input -> model & optimizer -> shard -> step -> restore ->
loop. Re-running the same command resumes from the newest intact checkpoint in `workdir` and ends with the
same parameters as an uninterrupted run (the data position is the step, the RNG is in the checkpoint). What
the workdir holds, and how a resume treats a changed config, is in `repjax.workdir`.

Exit status of `main`: 0 finished (total_steps reached), 2 bad config or input (one line on stderr; also a
refused config change, a locked workdir, a non-finite loss), 3 preempted (SIGTERM/SIGINT: saved, rerun to
resume), 4 stopped by `--stop_after` before total_steps (saved, rerun to continue).
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from repjax import checkpoint, config as config_lib, data, evals, losses, sharding, workdir as workdir_lib
from repjax.build import build, example_shape, load_init
from repjax.data import pipeline
from repjax.evals import classification, cost
from repjax.metrics import METRICS_FILE, MetricWriter, ProgressBar, read_metrics
from repjax.nn import conv
from repjax.step import TrainState, make_eval_step, make_train_step

EXIT_FINISHED, EXIT_ERROR, EXIT_PREEMPTED, EXIT_STOPPED = 0, 2, 3, 4
ELAPSED = "train/elapsed_seconds"  # in every log row: wall time of training so far, summed over resumed parts


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


def _check_finite(step: int, metrics: dict[str, Any], last_saved: int | None) -> None:
    loss = float(metrics["loss"])
    if not (math.isfinite(loss) and metrics["finite"]):
        kept = f"the last good checkpoint is step {last_saved}" if last_saved is not None else "no checkpoint"
        what = f"Loss is {loss}" if not math.isfinite(loss) else f"Loss is {loss} but the update is not finite"
        raise NonFiniteLossError(f"{what} at step {step}; stopping ({kept}).")


def configure(config) -> None:
    """Process-wide settings that come from the config (the conv weight-gradient mode; data settings travel
    with each source in `repjax.data.SourceOptions`)."""
    conv.set_chunked_default(config.conv_chunked_wgrad)


def check_eval(config, model, abstract_state, eval_source, num_classes: int) -> None:
    """Before the first step: the eval split matches training and its preprocessing feeds the model."""
    if eval_source.num_classes != num_classes:
        raise ValueError(f"data.eval_split {config.data.eval_split!r} has {eval_source.num_classes} classes, "
                         f"the training split {num_classes}")
    shape = example_shape(eval_source, config.data.eval_pp)
    batch = {"image": jax.ShapeDtypeStruct((1, *shape), np.float32),
             "label": jax.ShapeDtypeStruct((1,), np.int32)}
    try:
        loss = losses.from_config(config.loss, train=False)
        jax.eval_shape(make_eval_step(model, loss), abstract_state.variables(), batch)
    except Exception as e:
        raise ValueError(f"data.eval_pp {config.data.eval_pp!r} gives images of shape {shape} that the model "
                         f"cannot evaluate: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    evals.check(config)


def train(config, workdir: str | pathlib.Path, *, stop_after: int | None = None,
          allow_config_change: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the experiment `config` in `workdir`; returns the final metrics.

    `stop_after` ends this invocation after that many steps with a checkpoint (time-sliced jobs, tests).
    A resume whose config changes the result raises `workdir.ConfigChangedError` unless `allow_config_change`.
    """
    config_lib.validate(config)
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1, got {stop_after}")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lib.WorkdirLock(workdir), contextlib.ExitStack() as closing:
        return _train(config, workdir, stop_after, allow_config_change, closing)


def _train(config, workdir: pathlib.Path, stop_after: int | None, allow_config_change: bool,
           closing: contextlib.ExitStack) -> dict[str, Any]:
    configure(config)

    # ---------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(config.mesh)
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh))
    if config.batch_size % (mesh.size) or config.batch_size % jax.process_count():
        raise ValueError(f"batch_size {config.batch_size} must divide over {mesh.size} devices")

    # ---------------------------------------------------------------- Input
    train_source = data.from_config(config, config.data.train_split)
    eval_source = data.from_config(config, config.data.eval_split)
    num_classes = train_source.num_classes
    image_shape = example_shape(train_source, config.data.train_pp)
    config = config_lib.resolve_epochs(config, len(train_source))

    # ---------------------------------------------------------------- Model, optimizer, sharded state
    built = build(config, num_classes, image_shape, mesh)
    model, tx, schedule, state_sharding = built.model, built.tx, built.schedule, built.state_sharding
    check_eval(config, model, built.abstract_state, eval_source, num_classes)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints,
                                   save_every_steps=config.checkpoint_every_steps)
    closing.enter_context(ckpt)

    def fresh_state() -> TrainState:
        state = jax.jit(built.make_state, out_shardings=state_sharding)()
        return load_init(config, state, state_sharding) if config.init.get("path") else state

    # A run that has checkpoints restores one below (a fresh state is made only if none is intact); a new run
    # loads its init weights before its config is recorded, so that a bad init path leaves no record.
    state = fresh_state() if ckpt.latest_step() is None else None
    note = workdir_lib.record_config(workdir, config, allow_change=allow_config_change)  # all checks passed
    if note and jax.process_index() == 0:
        print(note, flush=True)
    writer = closing.enter_context(MetricWriter(workdir))
    writer.write_hparams(config.to_dict(), file=False)

    # ---------------------------------------------------------------- Update step
    train_step = jax.jit(
        make_train_step(model, tx, schedule, losses.from_config(config.loss), config.ema_decay,
                        trainable=built.trainable),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    # ---------------------------------------------------------------- Restore
    restored = ckpt.restore(built.abstract_state, set_aside=True)
    start = 0
    if restored is not None:
        start, state, _ = restored
        print(f"Resumed from step {start} in {workdir}", flush=True)
    elif state is None:  # every checkpoint was damaged (and set aside): start over
        state = fresh_state()
    # Rows of steps this run repeats go (and the final rows of a finished run that is evaluated again).
    # TensorBoard hides the earlier files' events from the first repeated step on.
    writer.rewind(lambda r: r.get("step", 0) < start or (r.get("step", 0) == start and (
        start < config.total_steps or any(str(k).startswith("train/") for k in r))),
        purge_from=start + 1 if start else None)
    earlier_seconds = _elapsed_before(workdir, start)

    # ---------------------------------------------------------------- Loop
    batches = pipeline.train_batches(
        train_source, global_batch_size=config.batch_size, seed=config.seed, pp=config.data.train_pp,
        process_index=jax.process_index(), process_count=jax.process_count(), start_step=start,
        mixup_alpha=config.data.mixup_alpha, cutmix_alpha=config.data.cutmix_alpha,
        num_classes=num_classes, num_threads=config.data.num_threads)
    end = config.total_steps if stop_after is None else min(config.total_steps, start + stop_after)
    bar = ProgressBar(config.total_steps, initial_step=start, batch_size=config.batch_size)
    last_saved = ckpt.latest_step()
    pending: tuple[int, Any] | None = None  # this step's metrics, fetched after the next step is dispatched
    window: list[dict[str, float]] = []  # host metrics since the last log line
    status = "finished" if end == config.total_steps else "stopped"  # stopped: --stop_after reached
    started = time.perf_counter()
    try:
        with checkpoint.PreemptionGuard() as guard:
            for step in range(start + 1, end + 1):
                state, metrics = train_step(state, sharding.global_batch(next(batches), mesh))
                if pending is not None:  # the device is busy with `step`: check the previous one now
                    window.append(_checked(*pending, last_saved))
                pending = (step, metrics)
                # Processes must agree on the step at which they stop: they agree at log steps.
                preempted = guard.requested if jax.process_count() == 1 else (
                    step % config.log_every_steps == 0 and checkpoint.sync_flag(guard.requested))
                is_save = ckpt.should_save(step, force=step == end or preempted)
                if step % config.log_every_steps == 0 or is_save:
                    window.append(_checked(*pending, last_saved))
                    pending = None
                    mean = {k: float(np.mean([m[k] for m in window])) for k in window[-1]}
                    row = {f"train/{k}": v for k, v in mean.items()}
                    if earlier_seconds is not None:
                        row[ELAPSED] = earlier_seconds + time.perf_counter() - started
                    writer.write(step, row)
                    bar.update(step, mean)
                    window = []
                if is_save and ckpt.save(step, state, force=True):  # before evaluating: an eval error keeps it
                    last_saved = step
                if config.eval_every_steps and step % config.eval_every_steps == 0 and step != end:
                    writer.write(step, _evaluate(config, model, state, mesh, "eval"))
                if preempted:
                    status = "preempted"
                    print(f"Preempted: saved step {step} in {workdir}; rerun the command to resume.", flush=True)
                    break
    finally:
        bar.close()
        ckpt.wait()  # a pending asynchronous save of the last good state completes even on error
    step = int(jax.device_get(state.step))
    seconds = time.perf_counter() - started

    # ---------------------------------------------------------------- Final evaluation
    # train_seconds: the whole run's, over every resumed part (unknown when an earlier part's log row is gone);
    # train_img_s: over the whole run, or over this part alone when the earlier time is unknown
    total = None if earlier_seconds is None else earlier_seconds + seconds
    done, took = (step, total) if total is not None else (step - start, seconds)
    result: dict[str, Any] = {"step": step, "status": status, "params": cost.param_count(state.params),
                              "train_seconds": total,
                              "train_img_s": done * config.batch_size / took if done and took > 0 else None}
    if step >= config.total_steps:
        result.update(_evaluate(config, model, state, mesh, "test"))
        for name, spec in config.evals.items():
            spec = dict(spec)
            fn = evals.get(spec.pop("type"))
            metrics = fn(model, state.variables(ema=config.ema_decay > 0), config, mesh, **spec)
            result.update({f"{name}/{k}": v for k, v in metrics.items()})
        writer.write(step, {k: v for k, v in result.items() if isinstance(v, int | float)})
    return result


def _elapsed_before(workdir: pathlib.Path, start: int) -> float | None:
    """Training seconds of the earlier parts of a resumed run: the ELAPSED entry of the log row at `start`
    (a checkpoint step always has one); 0 for a fresh run, None when that row is missing (an older run)."""
    if start == 0:
        return 0.0
    path = pathlib.Path(workdir) / METRICS_FILE
    rows = [r for r in read_metrics(path) if r.get("step") == start and ELAPSED in r] if path.exists() else []
    return float(rows[-1][ELAPSED]) if rows else None


def _checked(step: int, metrics: dict[str, jax.Array], last_saved: int | None) -> dict[str, float]:
    """Host copy of a step's metrics; raises NonFiniteLossError if the step went non-finite."""
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(step, host, last_saved)
    del host["finite"]
    return host


def _evaluate(config, model, state: TrainState, mesh, prefix: str) -> dict[str, float]:
    source = data.from_config(config, config.data.eval_split)
    out = {}
    tags = [("", False)] + ([("ema_", True)] if config.ema_decay > 0 else [])
    for tag, ema in tags:
        metrics = classification.evaluate(model, state.variables(ema=ema), source,
                                                batch_size=config.eval_batch_size, pp=config.data.eval_pp,
                                                mesh=mesh, loss=losses.from_config(config.loss, train=False))
        out.update({f"{prefix}/{tag}{k}": v for k, v in metrics.items()})
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line; exits with the statuses listed in the module docstring."""
    from repjax import cli
    from repjax.metrics import summary

    config, args = cli.parse(sys.argv[1:] if argv is None else argv, need_workdir=True)
    try:
        result = train(config, args.workdir, stop_after=args.stop_after,
                       allow_config_change=args.allow_config_change)
    except (NonFiniteLossError, ValueError, KeyError, FileNotFoundError, workdir_lib.WorkdirLockedError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    if jax.process_index() == 0:
        print(summary(result), flush=True)
    status = {"finished": EXIT_FINISHED, "preempted": EXIT_PREEMPTED, "stopped": EXIT_STOPPED}[result["status"]]
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
