"""`python -m repjax.train --config configs/<name>.py[:arg] [--config.<key>=<value>] --workdir <dir>`.

One function, read top to bottom: mesh -> input -> model & optimizer -> shard -> step -> restore -> loop.
Re-running the same command resumes from the last checkpoint in `workdir` and ends with the same
parameters as an uninterrupted run (the data position and RNG are part of the checkpoint).
"""

from __future__ import annotations

import math
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from repjax import checkpoint, config as config_lib, data, evals, sharding
from repjax.build import build, example_shape, load_init
from repjax.data import pipeline
from repjax.evals import classification, cost
from repjax.metrics import MetricWriter, ProgressBar
from repjax.step import TrainState, make_train_step


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


def _check_finite(step: int, metrics: dict[str, Any], last_saved: int | None) -> None:
    loss = float(metrics["loss"])
    if not (math.isfinite(loss) and metrics["finite"]):
        kept = f"the last good checkpoint is step {last_saved}" if last_saved is not None else "no checkpoint"
        what = f"Loss is {loss}" if not math.isfinite(loss) else f"Loss is {loss} but the update is not finite"
        raise NonFiniteLossError(f"{what} at step {step}; stopping ({kept}).")


def train(config, workdir: str | pathlib.Path, *, stop_after: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the experiment `config` in `workdir`; returns the final metrics.

    `stop_after` ends this invocation after that many steps with a checkpoint (time-sliced jobs, tests).
    """
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    writer = MetricWriter(workdir)
    writer.write_hparams(config.to_dict())

    # ---------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(config.mesh)
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh))
    if config.batch_size % (mesh.size) or config.batch_size % jax.process_count():
        raise ValueError(f"batch_size {config.batch_size} must divide over {mesh.size} devices")

    # ---------------------------------------------------------------- Input
    train_source = data.get_source(config.data.source, config.data.train_split)
    num_classes = train_source.num_classes
    image_shape = example_shape(train_source, config.data.train_pp)

    # ---------------------------------------------------------------- Model, optimizer, sharded state
    built = build(config, num_classes, image_shape, mesh)
    model, tx, schedule, state_sharding = built.model, built.tx, built.schedule, built.state_sharding
    state = jax.jit(built.make_state, out_shardings=state_sharding)()
    if config.init.get("path"):
        state = load_init(config, state, state_sharding)

    # ---------------------------------------------------------------- Update step
    train_step = jax.jit(
        make_train_step(model, tx, schedule, config.loss.label_smoothing, config.ema_decay,
                        trainable=built.trainable),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    # ---------------------------------------------------------------- Restore
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints,
                                   save_every_steps=config.checkpoint_every_steps)
    restored = ckpt.restore(built.abstract_state)
    start = 0
    if restored is not None:
        start, state, _ = restored
        print(f"Resumed from step {start} in {workdir}", flush=True)

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
                    writer.write(step, {f"train/{k}": v for k, v in mean.items()})
                    bar.update(step, mean)
                    window = []
                if config.eval_every_steps and step % config.eval_every_steps == 0 and step != end:
                    writer.write(step, _evaluate(config, model, state, mesh, "eval"))
                if is_save and ckpt.save(step, state, {"data": batches.get_state()}, force=True):
                    last_saved = step
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
    result: dict[str, Any] = {"step": step, "status": status, "params": cost.param_count(state.params),
                              "train_seconds": seconds,
                              "train_img_s": (step - start) * config.batch_size / max(seconds, 1e-9)}
    if step >= config.total_steps:
        result.update(_evaluate(config, model, state, mesh, "test"))
        for name, spec in config.evals.items():
            spec = dict(spec)
            fn = evals.get(spec.pop("type"))
            metrics = fn(model, state.variables(ema=config.ema_decay > 0), config, mesh, **spec)
            result.update({f"{name}/{k}": v for k, v in metrics.items()})
        writer.write(step, {k: v for k, v in result.items() if isinstance(v, int | float)})
    writer.close()
    ckpt.close()
    return result


def _checked(step: int, metrics: dict[str, jax.Array], last_saved: int | None) -> dict[str, float]:
    """Host copy of a step's metrics; raises NonFiniteLossError if the step went non-finite."""
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(step, host, last_saved)
    del host["finite"]
    return host


def _evaluate(config, model, state: TrainState, mesh, prefix: str) -> dict[str, float]:
    source = data.get_source(config.data.source, config.data.eval_split)
    out = {}
    tags = [("", False)] + ([("ema_", True)] if config.ema_decay > 0 else [])
    for tag, ema in tags:
        metrics = classification.evaluate(model, state.variables(ema=ema), source,
                                                batch_size=config.eval_batch_size, pp=config.data.eval_pp,
                                                mesh=mesh)
        out.update({f"{prefix}/{tag}{k}": v for k, v in metrics.items()})
    return out


def main(argv: list[str] | None = None) -> None:
    from repjax import cli

    config, args = cli.parse(sys.argv[1:] if argv is None else argv, need_workdir=True)
    try:
        result = train(config, args.workdir, stop_after=args.stop_after)
    except (NonFiniteLossError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    cli.print_summary(result)


if __name__ == "__main__":
    main()
