"""Where a training step's time goes, per HLO op (repjax) and per aten op (PyTorch): shares, not seconds.

    python experiments/profile_step.py resnet20 --batch 128 --size 32 [--steps 5] [--top 25]
    python experiments/profile_step.py dwconv --batch 8 --size 56 --channels 96 --kernel 3 --method shift

Shares of the step are robust to a shared machine where wall-clock figures are not: every op slows down
alike when other processes take the cores. repjax: `jax.profiler` trace of `steps` compiled steps; XLA:CPU's
thunk executor records one event per thunk (fusion, convolution, dot, copy...) named after its HLO
instruction, which is looked up in the compiled HLO for its opcode, shape and the JAX op it came from
(`metadata op_name`, e.g. `transpose(jvp(conv_general_dilated))` = a convolution's gradient). Durations are
summed per instruction over all threads (a thunk runs on one thread but may fan out to the intra-op pool, so
shares are of the summed thunk time). PyTorch: `torch.profiler` self CPU time per aten op.
Writes `experiments/results/profile_step/<name>.json`.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import pathlib
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from repjax import config as config_lib, models, optim  # noqa: E402
from repjax.step import init_state, make_train_step  # noqa: E402

OUT = REPO / "experiments" / "results" / "profile_step"
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? (\w[\w-]*)\(")
_OPNAME = re.compile(r'op_name="([^"]+)"')


def hlo_index(hlo_text: str) -> dict[str, dict[str, str]]:
    """instruction name -> {opcode, shape, op_name} from compiled HLO text (entry and nested computations).

    A fusion without an op name whose only trace is the bitcast reading it (XLA:CPU's YNNPACK fusion of a
    convolution's weight gradient carries its op name on that bitcast) takes the bitcast's op name."""
    out, bitcasts = {}, []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            op = _OPNAME.search(line)
            out[m.group(1)] = {"opcode": m.group(3), "shape": m.group(2), "op_name": op.group(1) if op else ""}
            operand = re.search(r" bitcast\(%?([\w.\-]+)\)", line)
            if operand and op:
                bitcasts.append((operand.group(1), op.group(1)))
    for name, op_name in bitcasts:
        if name in out and not out[name]["op_name"]:
            out[name]["op_name"] = op_name
    return out


def category(name: str, info: dict[str, str] | None, batch: int) -> str:
    """Coarse kind of a thunk, from the JAX op it came from (XLA:CPU wraps convolutions in YNNPACK fusions, so
    the opcode alone does not tell): conv forward / input grad / weight grad (output not batch-major),
    layout transposes and copies, other fusions."""
    op = (info or {}).get("op_name", "")
    opcode = (info or {}).get("opcode", "")
    shape = (info or {}).get("shape", "")
    lead = re.match(r"\w+\[(\d+)", shape)
    batch_major = bool(lead) and int(lead.group(1)) == batch
    if "conv_general_dilated" in op or opcode == "convolution":
        if "transpose(jvp(" in op:
            return "conv input grad" if batch_major else "conv weight grad"
        return "conv forward"
    if opcode in ("transpose", "copy") or name.startswith(("transpose", "copy")):
        return "transpose/copy (layout)"
    if opcode == "dot" or "dot_general" in op:
        return "dot"
    if "reduce" in op or opcode == "reduce":
        return "reduce"
    return "other fusion (elementwise, BN, optimizer, pad...)"


def jax_profile(fn, args, steps: int, batch: int) -> list[dict]:
    """Per-instruction summed thunk time of `steps` calls of the jitted `fn(*args)` (returns args for next)."""
    from jax.profiler import ProfileData

    compiled = fn.lower(*args).compile()
    index = hlo_index(compiled.as_text())
    out = compiled(*args)
    jax.block_until_ready(out)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(steps):
            out = compiled(*args)
            jax.block_until_ready(out)
        jax.profiler.stop_trace()
        pd = ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[-1])
        totals: dict[str, float] = collections.defaultdict(float)
        for plane in pd.planes:
            if plane.name != "/host:CPU":
                continue
            for line in plane.lines:
                if not line.name.startswith("tf_XLA"):
                    continue
                for ev in line.events:
                    if ev.name in index:
                        totals[ev.name] += ev.duration_ns
    total = sum(totals.values())
    return [{"name": k, "share": v / total, "ms_per_step": v / 1e6 / steps, **index[k],
             "category": category(k, index[k], batch), "source": source(k, index[k])}
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]


def shares(rows: list[dict], key: str = "category") -> dict[str, float]:
    """Summed share of the step per value of `key` (`category` or `source`), largest first."""
    acc: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        acc[r[key]] += r["share"]
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def source(name: str, info: dict[str, str]) -> str:
    """`module/primitive` a thunk came from, e.g. `norm/rsqrt`, `pwconv1/dot_general`, `lk/fft` (the last two
    components of its JAX op name without the jit(...)/jvp(...)/transpose(...) wrappers; block indices dropped,
    so the same layer of every block adds up). Fusions take the name of their root op; a thunk XLA made up
    without an op name (a layout copy between two ops) is `(its instruction kind)`, e.g. `(transpose_copy_fusion)`."""
    names = [p for p in info["op_name"].split("/") if p and not re.fullmatch(r"\w+\(.*\)", p)]
    parts = [re.sub(r"_\d+(_\d+)*$", "", p) for p in names]
    return "/".join(parts[-2:]) if parts else "(" + re.sub(r"[.]\d+$", "", name) + ")"


def torch_profile(step, steps: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    avgs = [a for a in prof.key_averages() if a.self_cpu_time_total > 0]
    total = sum(a.self_cpu_time_total for a in avgs)
    return [{"name": a.key, "share": a.self_cpu_time_total / total, "ms_per_step": a.self_cpu_time_total / 1e3 / steps,
             "calls_per_step": a.count / steps} for a in sorted(avgs, key=lambda a: -a.self_cpu_time_total)]


def model_step(name: str, batch: int, size: int, kwargs: dict | None = None):
    """(jitted step, args, model) of the repjax training step of registry model `name(**kwargs)` (SGD momentum
    0.9)."""
    model = models.create(name, **(kwargs or {}))
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)}
    cfg = config_lib.defaults().optim
    cfg.schedule, cfg.weight_decay = "constant", 1e-4
    example = data["image"][:1]
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example, train=False))["params"]
    tx, schedule = optim.build(cfg, params, 1000)
    state = jax.jit(functools.partial(init_state, model, tx, example, 0, False))()
    return jax.jit(make_train_step(model, tx, schedule)), (state, data), model


def torch_model_step(model, batch: int, size: int):
    import torch
    import torch_models

    torch.manual_seed(0)
    net = torch_models.build(model)
    x, y = torch_models.numpy_batch(batch, size, model.num_classes)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def dwconv_step(batch: int, size: int, channels: int, k: int, method: str):
    from repjax.nn.dwconv import depthwise_conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 1, channels)) * 0.1, jnp.float32)
    g = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
    fn = jax.jit(jax.grad(lambda a, b, c: jnp.vdot(depthwise_conv(a, b, method), c), argnums=(0, 1)))
    return fn, (x, w, g)  # g an argument: a closed-over cotangent would be constant-folded into the program


def torch_dwconv_step(batch: int, size: int, channels: int, k: int):
    import torch

    tx = torch.randn(batch, channels, size, size, requires_grad=True)
    tk = torch.randn(channels, 1, k, k, requires_grad=True)
    tg = torch.randn(batch, channels, size, size)

    def step():
        tx.grad = tk.grad = None
        (torch.nn.functional.conv2d(tx, tk, padding=k // 2, groups=channels) * tg).sum().backward()

    return step


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help="a registry model name, or 'dwconv'")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=96)
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON, e.g. \'{"image_size": 64}\'')
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())  # XLA:CPU uses every core
    t0 = time.time()
    if args.target == "dwconv":
        fn, fargs = dwconv_step(args.batch, args.size, args.channels, args.kernel, args.method)
        tstep = None if args.no_torch else torch_dwconv_step(args.batch, args.size, args.channels, args.kernel)
        label = f"dwconv_{args.method}_n{args.batch}_{args.size}px_c{args.channels}_k{args.kernel}"
        jrows = jax_profile(fn, fargs, args.steps, args.batch)
    else:
        fn, (state, data), model = model_step(args.target, args.batch, args.size, args.model_kwargs)
        tstep = None if args.no_torch else torch_model_step(model, args.batch, args.size)
        label = f"{args.target}_n{args.batch}_{args.size}px"
        jrows = jax_profile(fn, (state, data), args.steps, args.batch)
    trows = torch_profile(tstep, args.steps) if tstep else []
    report = {"target": label, "command": "python experiments/profile_step.py " + " ".join(argv or sys.argv[1:]),
              "repjax_by_category": shares(jrows),
              "repjax_by_source": dict(list(shares(jrows, "source").items())[: args.top]),
              "repjax_ops": jrows[: args.top],
              "torch_ops": trows[: args.top], "repjax_all_ops": jrows, "seconds": time.time() - t0}
    print(f"== repjax {label}: share of summed thunk time by category")
    for k, v in report["repjax_by_category"].items():
        print(f"  {v:6.1%}  {k}")
    print("== repjax by source (module/primitive)")
    for k, v in report["repjax_by_source"].items():
        print(f"  {v:6.1%}  {k}")
    print("== repjax top ops")
    for r in jrows[: args.top]:
        print(f"  {r['share']:6.1%} {r['ms_per_step']:8.2f} ms  {r['name']:32s} {r['opcode']:12s} "
              f"{r['shape'][:40]:40s} {r['op_name'][-70:]}")
    if trows:
        print("== torch top ops (self CPU)")
        for r in trows[: args.top]:
            print(f"  {r['share']:6.1%} {r['ms_per_step']:8.2f} ms  {r['name']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{label}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
