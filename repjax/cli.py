"""Command-line parsing shared by `repjax.train` and `repjax.eval`.

`--config path.py[:arg]` loads `get_config(arg)` (default: `repjax.config.defaults()`), then each
`--config.a.b=value` override is applied in order. Values are Python literals (`0.1`, `True`,
`"[('.*', 'fsdp')]"`) or bare strings. Unknown keys and wrong types fail before any work starts.
"""

from __future__ import annotations

import argparse
import ast
from typing import Any

import ml_collections as mlc

from repjax import config as config_lib, distributed


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: mlc.ConfigDict, dotted: str, text: str) -> None:
    """Sets `config.<dotted> = literal(text)`, refusing new keys outside free-form blocks."""
    *parents, leaf = dotted.split(".")
    node = config
    walked = []
    for key in parents:
        walked.append(key)
        if key not in node:
            raise ValueError(_unknown(".".join(walked), config))
        node = node[key]
    value = _literal(text)
    path = dotted
    free = any(path.startswith(f + ".") or path == f for f in config_lib.FREE_FORM)
    if leaf not in node and not free:
        raise ValueError(_unknown(path, config))
    if leaf in node and node[leaf] is not None:
        current = node[leaf]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(current, list | tuple) and isinstance(value, list | tuple):
            value = list(value)
        if isinstance(current, str) and not isinstance(value, str):
            value = text  # e.g. --config.data.source=digits stays a string even if it parses
        if type(value) is not type(current) and not (isinstance(current, list) and isinstance(value, list)):
            raise ValueError(f"--config.{path}: expected {type(current).__name__}, got {value!r}")
    node[leaf] = value


def _unknown(path: str, config: mlc.ConfigDict) -> str:
    return f"unknown config key {path!r}" + config_lib.suggest(path, list(config_lib.flatten(config)))


def parse(argv: list[str], *, need_workdir: bool) -> tuple[mlc.ConfigDict, argparse.Namespace]:
    """Parses flags, starts `jax.distributed` if asked, returns the validated config and the flags."""
    parser = argparse.ArgumentParser(prog="python -m repjax.train",
                                     description="Train or evaluate a repjax experiment.")
    parser.add_argument("--config", default=None, help="configs/<name>.py[:arg] (default: built-in digits)")
    parser.add_argument("--workdir", required=need_workdir, default=None,
                        help="checkpoints, metrics.jsonl and TensorBoard logs go here")
    parser.add_argument("--stop_after", type=int, default=None, help="stop after N steps of this run")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-process)")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--cpu_devices", type=int, default=None, help="simulate N CPU devices")
    parser.add_argument("--checkpoint", default=None, help="(eval) a checkpoint directory or step dir")
    args, rest = parser.parse_known_args(argv)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.cpu_devices)

    config = config_lib.load(args.config) if args.config else config_lib.defaults()
    for item in rest:
        if not item.startswith("--config.") or "=" not in item:
            parser.error(f"unrecognized argument {item!r} (overrides look like --config.optim.lr=0.1)")
        dotted, _, text = item[len("--config."):].partition("=")
        try:
            apply_override(config, dotted, text)
        except (ValueError, TypeError, AttributeError) as e:
            parser.error(str(e))
    try:
        config_lib.validate(config)
    except ValueError as e:
        parser.error(str(e))
    return config, args


def print_summary(result: dict[str, Any]) -> None:
    print("\n== summary ==")
    for key, value in result.items():
        print(f"{key:>24s}: {value:.4f}" if isinstance(value, float) else f"{key:>24s}: {value}")
