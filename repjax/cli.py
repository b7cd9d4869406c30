"""Command-line parsing shared by `repjax.train` and `repjax.eval`.

`--config path.py[:arg]` loads `get_config(arg)` (default: `repjax.config.defaults()`; for `repjax.eval
--workdir W` without `--config`: the run's own config, `repjax.workdir.run_config`), then each
`--config.a.b=value` override is applied in order. Values are Python literals (`0.1`, `True`,
`"[('.*', 'fsdp')]"`) or bare strings. Unknown keys, wrong types, out-of-range values and errors inside
config files fail before any work starts, with one line per problem and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
from typing import Any

import ml_collections as mlc

from repjax import config as config_lib, distributed, workdir as workdir_lib


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
            value = list(value) if isinstance(current, list) else tuple(value)
        if isinstance(current, str) and not isinstance(value, str):
            value = text  # e.g. --config.data.source=digits stays a string even if it parses
        if type(value) is not type(current):
            raise ValueError(f"--config.{path}: expected {type(current).__name__}, got {value!r}")
    node[leaf] = value


def _unknown(path: str, config: mlc.ConfigDict) -> str:
    return f"unknown config key {path!r}" + config_lib.suggest(path, list(config_lib.flatten(config)))


def parse(argv: list[str], *, need_workdir: bool,
          program: str = "train") -> tuple[mlc.ConfigDict, argparse.Namespace]:
    """Parses flags, starts `jax.distributed` if asked, returns the validated config and the flags.

    `program` is "train" (`--stop_after`, `--allow_config_change`) or "eval" (`--checkpoint`; without
    `--config`, a `--workdir` supplies the run's own config).
    """
    parser = argparse.ArgumentParser(prog=f"python -m repjax.{program}",
                                     description="Train or evaluate a repjax experiment.")
    parser.add_argument("--config", default=None, help="configs/<name>.py[:arg] (default: built-in digits)")
    parser.add_argument("--workdir", required=need_workdir, default=None,
                        help="checkpoints, metrics.jsonl and the run's record go here (see repjax.workdir)")
    if program == "train":
        parser.add_argument("--stop_after", type=int, default=None,
                            help="stop after N steps of this run (exit status 4; rerun to continue)")
        parser.add_argument("--allow_config_change", action="store_true",
                            help="resume even if the config changes keys that alter the result (recorded)")
    else:
        parser.add_argument("--checkpoint", type=int, default=None,
                            help="the step to evaluate (default: the newest intact checkpoint)")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-process)")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--init_timeout", type=float, default=distributed.DEFAULT_TIMEOUT,
                        help="seconds for all processes to start (multi-process)")
    parser.add_argument("--cpu_devices", type=int, default=None, help="simulate N CPU devices")
    args, rest = parser.parse_known_args(argv)

    def fail(message: str) -> None:
        parser.exit(2, f"error: {message}\n")

    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.cpu_devices,
                               timeout=args.init_timeout)
    except distributed.StartupError as e:
        fail(str(e))
    try:
        if args.config:
            config = config_lib.load(args.config)
        elif program == "eval" and args.workdir:
            config = workdir_lib.run_config(args.workdir)
            if config is None:
                fail(f"{args.workdir} has no {workdir_lib.CONFIG_FILE} (not a repjax run, or from an older "
                     "version): give its --config")
        else:
            config = config_lib.defaults()
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    for item in rest:
        if not item.startswith("--config.") or "=" not in item:
            parser.error(f"unrecognized argument {item!r} (overrides look like --config.optim.lr=0.1)")
        dotted, _, text = item[len("--config."):].partition("=")
        try:
            apply_override(config, dotted, text)
        except (ValueError, TypeError, AttributeError) as e:
            fail(str(e))
    try:
        config_lib.validate(config)
    except ValueError as e:
        fail(str(e))
    return config, args
