"""`python -m repjax.eval --config <cfg> (--workdir <dir> | --config.init.path=<weights>) [--config...]`.

Evaluates the latest checkpoint of a workdir, or imported weights, on `config.data.eval_split` of
`config.data.source`: top-1/top-5/loss, parameter count, analytic MACs and XLA FLOPs (`repjax.evals.cost`) and
inference images/s,
plus every evaluator listed in `config.evals`.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import jax

from repjax import checkpoint, data, evals, sharding
from repjax.build import build, example_shape, load_init
from repjax.evals import classification, cost


def evaluate(config, *, workdir: str | None = None, throughput: bool = True) -> dict[str, Any]:
    """Metrics of a trained (workdir) or imported (`config.init.path`) model on the eval split."""
    mesh = sharding.make_mesh(config.mesh)
    source = data.get_source(config.data.source, config.data.eval_split)
    image_shape = example_shape(source, config.data.eval_pp)
    built = build(config, source.num_classes, image_shape, mesh)
    model, state_sharding = built.model, built.state_sharding
    state = jax.jit(built.make_state, out_shardings=state_sharding)()
    if workdir is not None:
        ckpt = checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints")
        restored = ckpt.restore(built.abstract_state)
        if restored is None:
            raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints")
        step, state, _ = restored
        ckpt.close()
    elif config.init.get("path"):
        state, step = load_init(config, state, state_sharding), 0
    else:
        raise ValueError("Nothing to evaluate: give --workdir or --config.init.path")

    variables = state.variables(ema=config.ema_decay > 0)
    result: dict[str, Any] = {"step": int(step), "split": config.data.eval_split, "examples": len(source)}
    result.update(classification.evaluate(model, variables, source, batch_size=config.eval_batch_size,
                                          pp=config.data.eval_pp, mesh=mesh))
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

    config, args = cli.parse(sys.argv[1:] if argv is None else argv, need_workdir=False)
    try:
        result = evaluate(config, workdir=args.workdir)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    cli.print_summary(result)
    if args.workdir and jax.process_index() == 0:
        (pathlib.Path(args.workdir) / "eval.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
