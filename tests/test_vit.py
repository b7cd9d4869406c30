"""ViT family: staged forward, any input size, position-embedding resampling, MACs, timm / big_vision import."""

import importlib
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import models
from repjax.io import torch as tio
from repjax.models import abstract_variables, vit

KEY = jax.random.key(0)


def _tiny(**kw):
    return models.create("vit_test", **kw)


def _init(model, size=16):
    """The variables' tree, shapes only (`jax.eval_shape` traces init, so config errors raise, without a compile);
    `_randomize` gives it values."""
    return jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, size, size, 3)), train=False))


def _apply(model, variables, x, method=None):
    """Jitted `model.apply(variables, x, method=method)`; `method(module, x)` may be a lambda."""
    return jax.jit(lambda v, a: model.apply(v, a, method=method))(variables, x)


def _images(n=2, size=16, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def _randomize(variables, seed=3, scale=0.2):
    """Every leaf random, drawn with numpy (so zero-initialised classifier/cls/biases take part in the
    comparisons); LayerNorm scales (initialised to 1, the only all-ones leaves) stay around 1."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        base = 1.0 if getattr(path[-1], "key", None) == "scale" and len(x.shape) == 1 else 0.0
        return jnp.asarray(rng.normal(size=x.shape) * scale + base, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.mark.parametrize("kw", [dict(), dict(pool="gap", gap_norm="pooled", posemb="sincos2d")])
def test_staged_methods_compose_to_call(kw):
    model = _tiny(**kw)
    lesion = model.clone(skip_blocks=(1,))
    v = _randomize(_init(model))
    x = _images()

    @jax.jit  # every form in one program: one compile
    def forms(v, x):
        def apply(inputs, method):
            return model.apply(v, inputs, method=method)

        tokens = apply(x, vit.ViT.embed)
        t1 = apply(tokens, lambda m, t: m.run_blocks(t, 0, 2))
        for i in (2, 3):
            t1 = apply(t1, lambda m, t, i=i: m.block(i, t))
        # Lesion study: skip_blocks == run_blocks without those blocks.
        t2 = apply(tokens, lambda m, t: m.run_blocks(t, skip=(1,)))
        return (model.apply(v, x), tokens, apply(t1, vit.ViT.head), lesion.apply(v, x),
                apply(t2, vit.ViT.head))

    full, tokens, staged, lesioned, lesioned_staged = forms(v, x)
    assert tokens.shape == (2, model.num_prefix + 16, 32)
    np.testing.assert_allclose(staged, full, atol=1e-5)
    np.testing.assert_allclose(lesioned, lesioned_staged, atol=1e-5)
    assert not np.allclose(lesioned, full, atol=1e-3)


def test_any_input_size_resamples_learned_posemb_like_import():
    """A 16 px model run at 24 px (on-the-fly resampling) == a 24 px model with the import-resampled weights."""
    small = _tiny(resample="bilinear")
    v = _randomize(_init(small))
    big = small.clone(image_size=24)
    imported = vit.from_torch(vit.to_torch(v, small), big)
    x = _images(size=24)
    np.testing.assert_allclose(_apply(small, v, x), _apply(big, imported, x), atol=1e-5)
    assert imported["params"]["pos_embed"].shape == (1, 1 + 36, 32)


def test_bilinear_resample_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    pe = np.random.default_rng(0).normal(size=(1, 16, 8)).astype(np.float32)
    ours = vit.resample_grid(jnp.asarray(pe), (4, 4), (6, 6), "bilinear")
    grid = torch.from_numpy(pe.reshape(4, 4, 8)).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, ref[0].permute(1, 2, 0).reshape(1, 36, 8).numpy(), atol=1e-6)


def test_sincos_posemb_values():
    pe = np.asarray(vit.posemb_sincos_2d(2, 3, 8))
    assert pe.shape == (1, 6, 8)
    # token (row 1, col 2): x = 2, y = 1; 2 frequencies 1 and 1e-4.
    omega = np.array([1.0, 1e-4])
    np.testing.assert_allclose(pe[0, 5], np.concatenate([np.sin(2 * omega), np.cos(2 * omega),
                                                         np.sin(1 * omega), np.cos(1 * omega)]), atol=1e-6)


def test_macs_vit_b16_and_exits():
    model = models.create("vit_b16")
    assert round(vit.macs(model, 224) / 1e9, 2) == 17.56  # fvcore's "17.6 GFLOPs"
    b = vit.macs_breakdown(model, 224)
    assert round(b.embed / 1e9, 3) == 0.116 and round(b.blocks[0] / 1e9, 3) == 1.454
    fractions = {k: b.to_block(k) / b.total for k in (3, 6, 9)}
    assert [round(100 * fractions[k], 1) for k in (3, 6, 9)] == [25.5, 50.3, 75.2]  # the spec's section 1.3
    assert vit.macs(model.clone(petl=dict(kind="adapter")), 224) - b.total == 12 * 197 * 2 * 768 * 8


@pytest.mark.parametrize("kw", [dict(), dict(petl=dict(kind="vpt", length=5)), dict(petl=dict(kind="lora"))])
def test_macs_match_xla_cost_analysis(kw):
    """ViT-B width, 2 blocks, 224 px: analytic MACs within 2% of XLA's FLOPs / 2 (XLA also counts norms,
    softmax, GELU: 1.5% here). Compiled on abstract shapes: nothing of ViT-B's size is allocated."""
    model = models.create("vit_b16", depth=2, **kw)
    variables = abstract_variables(model, 224)
    fn = jax.jit(lambda v, x: model.apply(v, x))
    analysis = fn.lower(variables, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    ours = vit.macs(model, 224)
    assert abs(analysis["flops"] / 2 - ours) / ours < 0.02, (analysis["flops"] / 2, ours)


# ------------------------------------------------------------------ checkpoints


def _torch_reference(sd, x, num_heads, pool="cls"):
    """A minimal PyTorch ViT forward written on timm's state_dict keys (timm itself needs torchvision)."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
    x = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)
    w = t["patch_embed.proj.weight"]
    x = F.conv2d(x, w, t["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    if "cls_token" in t:
        x = torch.cat([t["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + t["pos_embed"]
    d = x.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in t if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), t[p + "norm1.weight"], t[p + "norm1.bias"], 1e-6)
        q, k, v = F.linear(h, t[p + "attn.qkv.weight"], t[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (num_heads, -1)).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + F.linear(a, t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), t[p + "norm2.weight"], t[p + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])),
                     t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])
        x = x + h
    if pool == "cls":
        x = F.layer_norm(x, (d,), t["norm.weight"], t["norm.bias"], 1e-6)[:, 0]
    else:
        x = F.layer_norm(x.mean(1), (d,), t["fc_norm.weight"], t["fc_norm.bias"], 1e-6)
    return F.linear(x, t["head.weight"], t["head.bias"]).numpy()


@pytest.mark.parametrize("kw", [dict(), dict(pool="gap", gap_norm="pooled")])
def test_timm_layout_round_trip_and_reference_forward(kw):
    pytest.importorskip("torch")
    model = _tiny(**kw)
    v = _randomize(_init(model))
    sd = vit.to_torch(v, model)
    assert "blocks.3.attn.qkv.weight" in sd and sd["blocks.0.attn.qkv.weight"].shape == (96, 32)
    back = vit.from_torch(sd, model)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, v))
    x = _images()
    np.testing.assert_allclose(_apply(model, v, x), _torch_reference(sd, x, 2, model.pool), atol=2e-5)
    with pytest.raises(tio.WeightImportError, match="unexpected torch keys"):
        vit.from_torch({**sd, "blocks.9.extra": np.zeros(1)}, model)


def _import_timm():
    """timm, if installed; it imports torchvision at module level for features a ViT does not use, so when
    torchvision is absent an empty stand-in module is installed first (only timm's ViT code runs)."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    if importlib.util.find_spec("torchvision") is None:
        class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                if name == "torchvision" or name.startswith("torchvision."):
                    return importlib.machinery.ModuleSpec(name, self, is_package=True)
                return None

            def create_module(self, spec):
                class AnyAttr(type):  # classes whose attributes are classes (InterpolationMode.NEAREST, ...)
                    def __getattr__(cls, attr):
                        return AnyAttr(attr, (), {})

                class Stub(types.ModuleType):
                    def __getattr__(self, attr):
                        if attr.startswith("__"):
                            raise AttributeError(attr)
                        return AnyAttr(attr, (), {})

                module = Stub(spec.name)
                module.__path__ = []
                return module

            def exec_module(self, module):
                pass

        sys.meta_path.insert(0, Finder())
    try:
        return importlib.import_module("timm")
    except Exception as e:  # timm version that needs more of torchvision
        pytest.skip(f"timm does not import here: {e}")


@pytest.mark.parametrize("kw", [dict(), dict(global_pool="avg", class_token=False)])
def test_timm_forward_on_same_random_weights(kw):
    torch = pytest.importorskip("torch")
    timm = _import_timm()
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, patch_size=8,
                            embed_dim=48, depth=3, num_heads=3, **kw).eval()
    for p in ref.parameters():  # timm zero-initialises some tensors: make every one random
        torch.nn.init.normal_(p, std=0.2)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    model = vit.infer(sd, vit.ViT(width=48, num_heads=3))  # a timm checkpoint does not store num_heads
    assert (model.width, model.depth, model.num_heads, model.patch_size, model.image_size, model.pool) == (
        48, 3, 3, 8, 32, "cls" if not kw else "gap")
    variables = vit.from_torch(sd, model)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(_apply(model, variables, jnp.asarray(x)), expected, atol=1e-4, rtol=1e-4)
    jax.tree.map(np.testing.assert_array_equal, vit.to_torch(variables, model), sd)


def _as_augreg(sd, heads):
    """A timm state_dict laid out as an AugReg `.npz` (the vision_transformer repo's names and shapes)."""
    d = sd["cls_token"].shape[-1]
    out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
           "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
           "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
           "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        out[b + "LayerNorm_0/scale"], out[b + "LayerNorm_0/bias"] = sd[t + "norm1.weight"], sd[t + "norm1.bias"]
        out[b + "LayerNorm_2/scale"], out[b + "LayerNorm_2/bias"] = sd[t + "norm2.weight"], sd[t + "norm2.bias"]
        w, bias = sd[t + "attn.qkv.weight"], sd[t + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            m = b + f"MultiHeadDotProductAttention_1/{n}/"
            out[m + "kernel"] = w[j * d:(j + 1) * d].T.reshape(d, heads, d // heads)
            out[m + "bias"] = bias[j * d:(j + 1) * d].reshape(heads, d // heads)
        out[b + "MultiHeadDotProductAttention_1/out/kernel"] = sd[t + "attn.proj.weight"].T.reshape(heads, -1, d)
        out[b + "MultiHeadDotProductAttention_1/out/bias"] = sd[t + "attn.proj.bias"]
        for r in (0, 1):
            out[b + f"MlpBlock_3/Dense_{r}/kernel"] = sd[t + f"mlp.fc{r + 1}.weight"].T
            out[b + f"MlpBlock_3/Dense_{r}/bias"] = sd[t + f"mlp.fc{r + 1}.bias"]
    return out


def test_big_vision_npz_import_and_infer(tmp_path):
    model = _tiny()
    v = _randomize(_init(model))
    npz = _as_augreg(vit.to_torch(v, model), heads=2)
    tio.save_state_dict(tmp_path / "vit.npz", npz)
    loaded = tio.load_state_dict(tmp_path / "vit.npz")
    inferred = vit.infer(loaded, models.create("vit_b16"))  # heads read off the query kernel
    assert (inferred.width, inferred.depth, inferred.num_heads, inferred.patch_size, inferred.image_size,
            inferred.num_classes) == (32, 4, 2, 4, 16, 10)
    imported = vit.from_torch(loaded, inferred)
    jax.tree.map(np.testing.assert_allclose, imported, jax.tree.map(np.asarray, v))
    # Scanned big_vision stacks ("Transformer/encoderblock/...", leading depth axis) read the same.
    scanned = {k: x for k, x in npz.items() if "encoderblock_" not in k}
    for k in [k for k in npz if k.startswith("Transformer/encoderblock_0/")]:
        tail = k[len("Transformer/encoderblock_0/"):]
        scanned["params/Transformer/encoderblock/" + tail] = np.stack(
            [npz[f"Transformer/encoderblock_{i}/{tail}"] for i in range(4)])
    scanned = {(k if k.startswith("params/") else "params/" + k): x for k, x in scanned.items()}
    jax.tree.map(np.testing.assert_allclose, vit.from_torch(scanned, inferred), imported)
    with pytest.raises(tio.WeightImportError, match="not understood"):
        vit.from_torch({**npz, "MAPHead_0/probe": np.zeros(3)}, inferred)


def test_import_resamples_posemb_and_checks_class_positions():
    model = _tiny()
    sd = vit.to_torch(_randomize(_init(model)), model)
    bigger = vit.from_torch(sd, model.clone(image_size=32))
    assert bigger["params"]["pos_embed"].shape == (1, 1 + 64, 32)
    with pytest.raises(tio.WeightImportError, match="class-token positions"):
        vit.from_torch(sd, model.clone(posemb_cls=False))
    assert math.isclose(float(np.asarray(bigger["params"]["pos_embed"])[0, 0, 0]), float(sd["pos_embed"][0, 0, 0]))


def test_bad_config_errors():
    with pytest.raises(ValueError, match="pool must be"):
        _init(_tiny(pool="max"))
    with pytest.raises(ValueError, match="skip_blocks"):
        _init(_tiny(skip_blocks=(7,)))
