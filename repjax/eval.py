"""`python -m repjax.eval (--workdir <dir> [--checkpoint STEP] | --config <cfg> --config.init.path=<w>) [--config...]`.

Evaluates a checkpoint of a workdir, or imported weights, on `config.data.eval_split` of
`config.data.source`: top-1/top-5/loss, parameter count, analytic MACs and XLA FLOPs (`repjax.evals.cost`) and
inference images/s,
plus every evaluator listed in `config.evals`.

A workdir is evaluated with the run's own config (`repjax.workdir.run_config`): `--config.<key>=<value>`
(or a `--config` file) may change keys, and every key that differs from the run's config is listed in the
result as `config_overrides`. `--checkpoint STEP` evaluates exactly that step (an unknown step is an error
listing the available ones; a damaged one is an error naming what is wrong); without it, the newest intact
checkpoint. Each evaluation of a workdir appends one record to `<workdir>/evals.jsonl`.
"""

from __future__ import annotations

import copy
import pathlib
import sys
from typing import Any

import jax

from repjax import checkpoint, config as config_lib, data, evals, losses, sharding, workdir as workdir_lib
from repjax.build import build, example_shape, load_init
from repjax.evals import classification, cost


def evaluate(config=None, *, workdir: str | None = None, step: int | None = None,
             throughput: bool = True) -> dict[str, Any]:
    """Metrics of a trained (workdir) or imported (`config.init.path`) model on the eval split.

    With a `workdir`, `config` defaults to the run's config; keys where it differs are `config_overrides`.
    `step` picks the checkpoint (default: the newest intact one).
    """
    from repjax.train import check_eval, configure

    overrides: dict[str, Any] = {}
    if workdir is not None:
        run = workdir_lib.run_config(workdir)
        if config is None:
            if run is None:
                raise FileNotFoundError(f"{workdir} has no {workdir_lib.CONFIG_FILE}: give the run's config")
            config = run
        elif run is not None:
            config = copy.deepcopy(config)
            for steps_key, epochs_key in config_lib.EPOCH_KEYS:  # a config file's epochs: the run resolved them
                if config_lib.get(config, epochs_key) > 0 and config_lib.get(config, steps_key) == 0:
                    config_lib.set_value(config, steps_key, config_lib.get(run, steps_key))
            overrides = {k: new for k, (_, new) in workdir_lib.config_diff(run, config).items()}
    elif config is None:
        raise ValueError("Nothing to evaluate: give --workdir or --config.init.path")
    configure(config)
    mesh = sharding.make_mesh(config.mesh)
    source = data.from_config(config, config.data.eval_split)
    image_shape = example_shape(source, config.data.eval_pp)
    built = build(config, source.num_classes, image_shape, mesh)
    model, state_sharding = built.model, built.state_sharding
    check_eval(config, model, built.abstract_state, source, source.num_classes)
    if workdir is not None:  # restored into the abstract state: no initialisation is built or run
        with checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints") as ckpt:
            restored = ckpt.restore(built.abstract_state, step)
        if restored is None:
            raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints (or none intact)")
        step, state, _ = restored
    elif config.init.get("path"):
        state = jax.jit(built.make_state, out_shardings=state_sharding)()
        state, step = load_init(config, state, state_sharding), 0
    else:
        raise ValueError("Nothing to evaluate: give --workdir or --config.init.path")

    variables = state.variables(ema=config.ema_decay > 0)
    result: dict[str, Any] = {"step": int(step), "split": config.data.eval_split, "examples": len(source)}
    if workdir is not None:
        result["config_overrides"] = overrides
    result.update(classification.evaluate(model, variables, source, batch_size=config.eval_batch_size,
                                          pp=config.data.eval_pp, mesh=mesh,
                                          loss=losses.from_config(config.loss, train=False)))
    result.update(cost.model_cost(model, variables, image_shape))  # params, macs_analytic, xla_flops_reference
    if throughput:
        result["images_per_s"] = cost.throughput(model, variables, image_shape)
    for name, spec in config.evals.items():
        spec = dict(spec)
        metrics = evals.get(spec.pop("type"))(model, variables, config, mesh, **spec)
        result.update({f"{name}/{k}": v for k, v in metrics.items()})
    return result


def main(argv: list[str] | None = None) -> None:
    from repjax import cli
    from repjax.metrics import summary

    config, args = cli.parse(sys.argv[1:] if argv is None else argv, need_workdir=False, program="eval")
    try:
        result = evaluate(config, workdir=args.workdir, step=args.checkpoint)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        raise SystemExit(2) from None
    if jax.process_index() == 0:
        print(summary(result, title="Evaluation"), flush=True)
    if args.workdir:
        path = workdir_lib.append_eval(args.workdir, {"checkpoint": result["step"], "result": result})
        if jax.process_index() == 0:
            print(f"Recorded in {path}", flush=True)


if __name__ == "__main__":
    main()
