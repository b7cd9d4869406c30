"""Single-op probes behind the speed changes and dead ends of `bench_models` on XLA:CPU, each form side by side.

    python experiments/xla_cpu_probes.py [--repeats 7]   # -> experiments/results/xla_cpu_probes.json

- small_maps: a dense 3x3 convolution where the input or output map is smaller than the kernel, XLA's
  convolution against `repjax.nn.im2col.patches_conv` (forward, input gradient, kernel gradient);
  larger maps for contrast. Why `repjax.nn.conv.Conv` routes those maps to patches.
- gelu: `jax.nn.gelu(approximate=False)` (erfc form) against `repjax.nn.activations.gelu` (erf form).
- layernorm: `flax.linen.LayerNorm` against a closed-form custom-VJP LayerNorm, alone and (layernorm_in_step)
  in ConvNeXt's whole training step, where it decides (not adopted: see the README).
- dw_kernel_grad: `shift`'s K=3 depthwise kernel gradient (a reduction per tap over N, H, W) in one pass over the
  batch, in cache-sized chunks (what `shift` does), and as matrix-vector products with ones (a dead end).
Times are the minimum over `repeats` calls after warm-up calls (ms); within a probe the forms take turns.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from repjax import config as config_lib, models  # noqa: E402
from repjax.bench import fastest_interleaved, interleaved, train_runner  # noqa: E402
from repjax.nn.activations import gelu  # noqa: E402
from repjax.nn.dwconv import depthwise_conv  # noqa: E402
from repjax.nn.dwconv.shift import kernel_grad  # noqa: E402
from repjax.nn.im2col import patches_conv  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")
PAD = ((1, 1), (1, 1))


def side_by_side(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """ms of each zero-argument call, the forms of one probe taking turns (`repjax.bench.fastest_interleaved`)."""
    return {name: 1e3 * s for name, s in fastest_interleaved(calls, repeats).items()}


def normal(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def small_maps(repeats: int) -> list[dict]:
    out = []
    for n, s, cin, cout, stride in [(64, 2, 256, 256, 1), (64, 1, 256, 256, 1), (32, 4, 192, 1280, 2),
                                    (64, 3, 256, 256, 1), (32, 8, 128, 128, 1)]:
        x, w = normal((n, s, s, cin), 0), normal((3, 3, cin, cout), 1, 0.05)
        row = {"input": [n, s, s, cin], "kernel": [3, 3, cin, cout], "stride": stride}
        strides = (stride, stride)
        xla = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=PAD, dimension_numbers=DN)
        calls = {}
        for name, conv in (("xla", xla), ("patches", functools.partial(patches_conv, strides=strides, padding=PAD))):
            loss = functools.partial(lambda a, b, f: jnp.sum(f(a, b) ** 2), f=conv)
            calls[f"{name}_fwd_ms"] = functools.partial(jax.jit(conv), x, w)
            calls[f"{name}_dx_ms"] = functools.partial(jax.jit(jax.grad(loss, 0)), x, w)
            calls[f"{name}_dw_ms"] = functools.partial(jax.jit(jax.grad(loss, 1)), x, w)
        row.update(side_by_side(calls, repeats))
        oh = -(-s // stride)
        row["xla_fwd_gflops"] = 2 * n * oh * oh * 9 * cin * cout / row["xla_fwd_ms"] / 1e6
        out.append(row)
        print(row, flush=True)
    return out


def fwd_bwd_forms(forms: dict[str, Callable], x: jax.Array, repeats: int) -> dict[str, dict[str, float]]:
    """{form: {fwd_ms, fwd_bwd_ms}}, every form's forward and forward+backward timed side by side."""
    g = normal(x.shape, 9)
    calls = {}
    for name, fn in forms.items():
        calls[(name, "fwd_ms")] = functools.partial(jax.jit(fn), x)
        calls[(name, "fwd_bwd_ms")] = functools.partial(jax.jit(jax.grad(lambda a, f=fn: jnp.vdot(f(a), g))), x)
    times = side_by_side(calls, repeats)
    return {name: {kind: times[(name, kind)] for kind in ("fwd_ms", "fwd_bwd_ms")} for name in forms}


def gelu_forms(repeats: int) -> dict:
    x = normal((32, 16, 16, 192), 0, 2.0)
    out = {"shape": list(x.shape), **fwd_bwd_forms(
        {"erfc_jax_nn": lambda a: jax.nn.gelu(a, approximate=False), "erf_repjax": gelu}, x, repeats)}
    print(out, flush=True)
    return out


@jax.custom_vjp
def _normalize(x: jax.Array) -> jax.Array:
    return _normalize_fwd(x)[0]


def _normalize_fwd(x):
    xc = x - x.mean(-1, keepdims=True)
    r = lax.rsqrt((xc * xc).mean(-1, keepdims=True) + 1e-6)
    return xc * r, (xc * r, r)


def _normalize_bwd(res, g):
    xh, r = res  # d/dx of (x - mean) / std: r * (g - mean(g) - xh * mean(g * xh))
    return (r * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True)),)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def layernorm_forms(repeats: int) -> dict:
    x = normal((32, 16, 16, 48), 0)
    ln = nn.LayerNorm(1e-6)
    v = ln.init(jax.random.key(0), x)
    scale, bias = v["params"]["scale"], v["params"]["bias"]
    forms = {"flax": lambda a: ln.apply(v, a), "custom_vjp": lambda a: _normalize(a) * scale + bias}
    np.testing.assert_allclose(forms["custom_vjp"](x), forms["flax"](x), atol=1e-5)  # the same function
    out = {"shape": list(x.shape), **fwd_bwd_forms(forms, x, repeats)}
    print(out, flush=True)
    return out


def _closed_form_layernorm(next_fun, args, kwargs, context):
    """Flax method interceptor: every applied `nn.LayerNorm` (eps 1e-6, last axis) as `_normalize` * scale + bias."""
    module = context.module
    if not isinstance(module, nn.LayerNorm) or context.method_name != "__call__" or module.is_initializing():
        return next_fun(*args, **kwargs)
    assert module.epsilon == 1e-6 and module.reduction_axes == -1, "the probe's closed form has eps 1e-6"
    x, params = args[0], module.variables["params"]
    return (_normalize(x.astype(jnp.float32)) * params["scale"] + params["bias"]).astype(x.dtype)


def layernorm_in_step(rounds: int) -> dict:
    """ConvNeXt's training step (`convnext_imagenette`, batch 32, 64 px, AdamW; the bench_models row) with Flax's
    LayerNorm and with every LayerNorm replaced by the closed form above (traced under a Flax method
    interceptor): img/s, medians of interleaved rounds (`repjax.bench.interleaved`)."""
    model = models.create("convnext_imagenette", num_classes=10)
    cfg = config_lib.defaults().optim
    cfg.name, cfg.lr, cfg.weight_decay, cfg.schedule = "adamw", 1e-3, 0.05, "constant"
    kw = dict(batch=32, image_shape=(64, 64, 3), iters=5)
    runners = {"flax_img_s": train_runner(model, cfg, **kw)[0]}
    with nn.intercept_methods(_closed_form_layernorm):  # the runner compiles (traces) its step here
        runners["closed_form_img_s"] = train_runner(model, cfg, **kw)[0]
    out = {"model": "convnext_imagenette", "batch": 32, "size": 64, **interleaved(runners, rounds)}
    print(out, flush=True)
    return out


def dw_kernel_grad(repeats: int) -> dict:
    """`shift`'s kernel gradient (one reduction per tap over N, H, W; `repjax.nn.dwconv.shift.kernel_grad`) in one
    pass over the batch and in its default cache-sized chunks, against the same sums as matrix-vector products
    with ones, and `shift`'s forward for scale; timed in interleaved rounds."""
    n, h, c, k = 8, 56, 96, 3
    x, dy = normal((n, h, h, c), 0), normal((n, h, h, c), 1)
    w = normal((k, k, 1, c), 2, 0.1)
    ones = jnp.ones((n * h * h,), jnp.float32)

    def gemv_form(a, b):
        ap = jnp.pad(a, ((0, 0), (k // 2,) * 2, (k // 2,) * 2, (0, 0)))
        taps = [ap[:, u:u + h, v:v + h, :] * b for u in range(k) for v in range(k)]
        return jnp.stack([ones @ t.reshape(-1, c) for t in taps]).reshape(k, k, c)

    # x and dy are arguments: closed over, they would be constants and XLA would fold the whole gradient
    forms = {"one_pass": jax.jit(lambda a, b: kernel_grad(a, b, k, k, chunk_bytes=a.nbytes)),
             "chunked": jax.jit(lambda a, b: kernel_grad(a, b, k, k)), "gemv": jax.jit(gemv_form)}
    ref = forms["one_pass"](x, dy)
    for f in forms.values():
        np.testing.assert_allclose(f(x, dy), ref, rtol=1e-3, atol=1e-2)  # the same sums
    calls = {f"{name}_ms": functools.partial(f, x, dy) for name, f in forms.items()}
    calls["shift_forward_ms"] = functools.partial(jax.jit(lambda a, b: depthwise_conv(a, b, "shift")), x, w)
    out = {"shape": [n, h, h, c], "kernel": k, "chunk_images": 1, **side_by_side(calls, repeats)}
    print(out, flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of layernorm_in_step")
    ap.add_argument("--out", type=pathlib.Path, default=REPO / "experiments/results/xla_cpu_probes.json")
    args = ap.parse_args(argv)
    report = {"command": "python experiments/xla_cpu_probes.py " + " ".join(argv or sys.argv[1:]),
              "jax_version": jax.__version__, "backend": jax.default_backend(),
              "small_maps": small_maps(args.repeats), "gelu": gelu_forms(args.repeats),
              "layernorm": layernorm_forms(args.repeats), "layernorm_in_step": layernorm_in_step(args.rounds),
              "dw_kernel_grad": dw_kernel_grad(args.repeats)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
