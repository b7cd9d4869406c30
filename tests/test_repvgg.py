"""RepVGG: train-form vs deploy-form equivalence, architecture/parameter counts, official PyTorch layout.

Tolerances (float32): deploy vs training form in eval mode, max|logits diff| <= 1e-5 * max|logits| (observed
2e-7 to 4e-7 on CPU); state_dict round trips are exact. BN statistics are randomized two ways: as the official
tools/verify.py (mean, var, gamma, beta ~ U(0, 0.1)) and a wider draw (mean ~ N(0, 0.5), var ~ U(0.2, 2),
gamma ~ U(0.5, 1.5), beta ~ N(0, 0.3)). Conversion is only valid with running statistics (eval mode);
`test_train_mode_is_not_equivalent` documents that it fails with batch statistics.
Full-size models are only shape-evaluated (jax.eval_shape), never allocated.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax.models import MODELS
from repjax.projects.repopt import repvgg as rv

REL_TOL = 1e-5
X_SHAPE = (2, 32, 32, 3)


def create(name, **kw):
    return MODELS.get(name)(**kw)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_init(model):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def random_variables(model, style="wide", seed=0):
    """Random variables for `model` drawn with numpy on its abstract tree (no JAX init, so no compiles):
    conv/dense kernels ~ N(0, 1/fan_in), other biases ~ N(0, 0.1), BN gamma/beta and running stats per `style`."""
    rng = np.random.default_rng(seed)
    bn_ranges = {"verify": dict(mean=(0, .1), var=(0, .1), scale=(0, .1), bias=(0, .1))}

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        in_bn = any(getattr(p, "key", "") in ("bn", "rbr_identity") for p in path)
        if name == "kernel":
            x = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif not in_bn and name == "bias":
            x = rng.normal(size=shape) * 0.1
        elif style == "verify":
            x = rng.uniform(*bn_ranges["verify"][name], size=shape)
        elif name == "var":
            x = rng.uniform(0.2, 2.0, size=shape)
        elif name == "scale":
            x = rng.uniform(0.5, 1.5, size=shape)
        else:
            x = rng.normal(size=shape) * (0.5 if name == "mean" else 0.3)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_init(model))


def tiny_variables(name, style="wide", seed=0):
    model = create(name)
    return model, random_variables(model, style, seed)


def rel_err(a, ref) -> float:
    return float(jnp.max(jnp.abs(a - ref)) / jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("style", ["verify", "wide"])
@pytest.mark.parametrize("name", ["repvgg_tiny", "repvgg_tiny_se"])
def test_deploy_equals_train_form_in_eval(name, style):
    """Tiny model: stride-1 blocks with identity, stride-2 blocks, groups 2 (with identity) and 4 (stride 2)."""
    model, variables = tiny_variables(name, style)
    x = jnp.asarray(np.random.default_rng(1).normal(size=X_SHAPE), jnp.float32)
    ref = jax.jit(model.apply)(variables, x)
    deploy_vars = jax.jit(rv.reparameterize)(variables)
    out = jax.jit(create(name, deploy=True).apply)(deploy_vars, x)
    assert out.shape == (2, 10) and out.dtype == jnp.float32
    assert rel_err(out, ref) < REL_TOL, rel_err(out, ref)


def test_train_mode_is_not_equivalent():
    """With batch statistics (train=True) the fused model differs: conversion needs eval-mode BN."""
    model, variables = tiny_variables("repvgg_tiny")
    x = jnp.asarray(np.random.default_rng(1).normal(size=X_SHAPE), jnp.float32)
    train_out, _ = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    out = jax.jit(create("repvgg_tiny", deploy=True).apply)(rv.reparameterize(variables), x)
    assert rel_err(out, train_out) > 1e-2


def test_tiny_structure():
    """Identity only where in == out and stride 1; groups where groups_map says; SE only when asked."""
    _, variables = tiny_variables("repvgg_tiny")
    p = variables["params"]
    with_id = {k for k, v in p.items() if "rbr_identity" in v}
    assert with_id == {"stage1_0", "stage2_1", "stage3_1"}
    assert p["stage2_1"]["rbr_dense"]["conv"]["kernel"].shape == (3, 3, 16, 32)  # layer 3, groups 2
    assert p["stage3_0"]["rbr_1x1"]["conv"]["kernel"].shape == (1, 1, 8, 64)  # layer 4, groups 4
    assert "se" not in p["stage0"] and "se" in abstract_init(create("repvgg_tiny_se"))["params"]["stage4_0"]


@pytest.mark.parametrize("name", ["repvgg_tiny_se", "repvgg_b1g4"])
def test_reparameterize_matches_deploy_model_tree(name):
    train_abs = abstract_init(create(name))
    got = jax.eval_shape(rv.reparameterize, train_abs)
    want = abstract_init(create(name, deploy=True))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert jax.tree.map(lambda a, b: a.shape == b.shape, got, want) == jax.tree.map(lambda a: True, want)


# Paper Table 4 params (M) of the inference-time model; the paper truncates to 2 decimals.
PAPER_PARAMS = {"a0": 8.30, "a1": 12.78, "b0": 14.33, "a2": 25.49, "b1g4": 36.12, "b1g2": 41.36, "b1": 51.82,
                "b2g4": 55.77, "b2": 80.31}


def expected_train_extra(model) -> int:
    """Train-form minus deploy-form params from the architecture alone: per block + 1x1 kernel + 2 BNs
    (+ identity BN) - the deploy bias."""
    groups, extra, c_in, layer = dict(model.groups_map), 0, 3, 0
    for s, depth in enumerate([1, *model.num_blocks]):
        for i in range(depth):
            c_out, g = model.widths[s], groups.get(layer, 1) if s else 1
            stride = model.strides[s] if i == 0 else 1
            extra += c_in // g * c_out + 4 * c_out + (2 * c_out if c_in == c_out and stride == 1 else 0) - c_out
            c_in, layer = c_out, layer + 1
    return extra


@pytest.mark.parametrize("name", [*PAPER_PARAMS, "b3", "b3g4", "d2se"])
def test_param_counts(name):
    model = create(f"repvgg_{name}")
    train = count(abstract_init(model)["params"])
    deploy = count(abstract_init(create(f"repvgg_{name}", deploy=True))["params"])
    assert train - deploy == expected_train_extra(model)
    if name in PAPER_PARAMS:
        assert math.floor(deploy / 1e4) / 100 == pytest.approx(PAPER_PARAMS[name]), deploy
    if name == "d2se":  # training-form count of the released D2se (timm model card: 133.3M)
        assert round(train / 1e5) / 10 == pytest.approx(133.3), train


def test_widths_depths_and_group_layers():
    assert rv.repvgg_widths(0.75, 2.5) == (48, 48, 96, 192, 1280)
    assert rv.repvgg_widths(2, 4) == (64, 128, 256, 512, 2048)
    model = create("repvgg_b1g2")
    params = abstract_init(model)["params"]
    blocks = [k for k in params if k.startswith("stage") and k != "stage0"]
    assert len(blocks) == 27 and model.num_blocks == (4, 6, 16, 1)
    c_in = 64
    for layer, name in enumerate(sorted(blocks, key=lambda k: tuple(map(int, k[5:].split("_")))), start=1):
        k = params[name]["rbr_dense"]["conv"]["kernel"]
        assert k.shape[2] == c_in // (2 if layer % 2 == 0 else 1), (layer, name)
        c_in = k.shape[3]
    assert params["linear"]["kernel"].shape == (2048, 1000)
    assert len([k for k in abstract_init(create("repvgg_d2se"))["params"] if k.startswith("stage")]) == 48


def test_registry_and_kwargs():
    names = [f"repvgg_{n}" for n in ("a0", "a1", "a2", "b0", "b1", "b1g2", "b1g4", "b2", "b2g2", "b2g4", "b3",
                                     "b3g2", "b3g4", "d2se", "tiny", "tiny_se")]
    assert all(n in MODELS for n in names)
    m = create("repvgg_a0", num_classes=7, deploy=True, dtype=jnp.bfloat16)
    assert (m.num_classes, m.deploy, m.dtype) == (7, True, jnp.bfloat16)
    model = create("repvgg_tiny", dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract_init(model)))
    out = jax.jit(model.apply)(random_variables(model), jnp.ones(X_SHAPE))
    assert out.dtype == jnp.float32 and out.shape == (2, 10)


# ---------------------------------------------------------------------------------------------------------
# Official PyTorch state_dict layout


def test_state_dict_keys_and_round_trip():
    model, variables = tiny_variables("repvgg_tiny_se")
    sd = rv.to_torch(variables, model)
    for key, shape in [("stage0.rbr_dense.conv.weight", (16, 3, 3, 3)), ("stage0.rbr_1x1.conv.weight", (16, 3, 1, 1)),
                       ("stage0.rbr_dense.bn.running_mean", (16,)), ("stage1.0.rbr_identity.running_var", (16,)),
                       ("stage2.1.rbr_dense.conv.weight", (32, 16, 3, 3)), ("stage1.0.rbr_identity.weight", (16,)),
                       ("stage3.0.se.down.weight", (16, 64, 1, 1)), ("stage3.0.se.up.bias", (64,)),
                       ("linear.weight", (10, 128)), ("linear.bias", (10,))]:
        assert sd[key].shape == shape, key
    assert "stage1.0.rbr_identity.num_batches_tracked" in sd and "stage2.0.rbr_identity.weight" not in sd
    back = rv.from_torch(sd, rv.infer_model(sd))
    chex.assert_trees_all_equal(back, variables)
    deploy = rv.reparameterize(variables)
    sd_d = rv.to_torch(deploy, create("repvgg_tiny_se", deploy=True))
    assert "stage1.0.rbr_reparam.weight" in sd_d and "stage1.0.rbr_reparam.bias" in sd_d
    assert not any("rbr_dense" in k or "running" in k for k in sd_d)
    prefixed = {f"module.{k}": v for k, v in sd_d.items()}
    back_d = rv.from_torch(prefixed, rv.infer_model(prefixed))
    chex.assert_trees_all_equal(back_d, deploy)
    assert rv.infer(prefixed, model) == create("repvgg_tiny_se", deploy=True)


def test_from_torch_is_strict():
    """Missing keys, unexpected keys, shape mismatches and the wrong form all raise, naming the keys."""
    model, variables = tiny_variables("repvgg_tiny")
    sd = rv.to_torch(variables, model)
    cases = [
        ({k: v for k, v in sd.items() if k != "stage2.1.rbr_1x1.bn.running_var"},
         r"missing torch keys \(1\):\n    stage2\.1\.rbr_1x1\.bn\.running_var"),
        ({**sd, "stage2.1.rbr_extra.weight": np.zeros(3)}, r"unexpected torch keys \(1\):\n    stage2\.1\.rbr_extra"),
        ({**sd, "stage0.rbr_1x1.conv.weight": np.zeros((16, 3, 3, 3))},
         r"shape mismatches \(1\):\n    stage0\.rbr_1x1\.conv\.weight"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            rv.from_torch(bad, model)
    with pytest.raises(ValueError, match="unexpected torch keys"):  # training keys loaded as deploy
        rv.from_torch(sd, create("repvgg_tiny", deploy=True))
    with pytest.raises(ValueError, match="deploy"):
        rv.infer_model(sd, deploy=True)
    sd_d = rv.to_torch(rv.reparameterize(variables, model), create("repvgg_tiny", deploy=True))
    with pytest.raises(ValueError, match=r"missing torch keys(.|\n)*unexpected torch keys"):  # deploy keys, train model
        rv.from_torch(sd_d, model)


def test_infer_model_from_state_dict():
    """Depths, widths, groups_map, SE and stride-1 first blocks (those with an identity) are recovered from a
    training state_dict; stage0's stride is not stored (default 2, override with strides=)."""
    for name in ["repvgg_tiny", "repvgg_tiny_se"]:
        model = create(name)
        sd = rv.to_torch(random_variables(model), model)
        got = rv.infer_model(sd)
        for field in ("num_blocks", "widths", "groups_map", "use_se", "se_reduction", "num_classes"):
            assert getattr(got, field) == getattr(model, field), field
        assert tuple(got.strides) == (2, 1, 2, 2, 2) and tuple(model.strides) == (1, 1, 2, 2, 2)
        assert tuple(rv.infer_model(sd, strides=(1, 1, 2, 2, 2)).strides) == (1, 1, 2, 2, 2)


def _torch_repvgg(model, deploy):
    """A small PyTorch RepVGG written here with the official module names (stage0, stageN.i, rbr_dense.conv,
    rbr_dense.bn, rbr_1x1, rbr_identity, rbr_reparam, se.down/up, linear) and SE before the ReLU."""
    torch = pytest.importorskip("torch")
    tnn = torch.nn

    def conv_bn(cin, cout, k, stride, groups):
        seq = tnn.Sequential()
        seq.add_module("conv", tnn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
        seq.add_module("bn", tnn.BatchNorm2d(cout))
        return seq

    class SE(tnn.Module):
        def __init__(self, c, r):
            super().__init__()
            self.down, self.up = tnn.Conv2d(c, c // r, 1), tnn.Conv2d(c // r, c, 1)

        def forward(self, x):
            s = torch.sigmoid(self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True)))))
            return x * s

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride, groups):
            super().__init__()
            self.se = SE(cout, model.se_reduction) if model.use_se else tnn.Identity()
            if deploy:
                self.rbr_reparam = tnn.Conv2d(cin, cout, 3, stride, 1, groups=groups)
            else:
                self.rbr_dense = conv_bn(cin, cout, 3, stride, groups)
                self.rbr_1x1 = conv_bn(cin, cout, 1, stride, groups)
                self.rbr_identity = tnn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

        def forward(self, x):
            if deploy:
                return torch.relu(self.se(self.rbr_reparam(x)))
            y = self.rbr_dense(x) + self.rbr_1x1(x)
            return torch.relu(self.se(y if self.rbr_identity is None else y + self.rbr_identity(x)))

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            groups, layer, w = dict(model.groups_map), 1, model.widths
            self.stage0 = Block(3, w[0], model.strides[0], 1)
            for s, depth in enumerate(model.num_blocks, start=1):
                blocks = []
                for i in range(depth):
                    blocks.append(Block(w[s - 1] if i == 0 else w[s], w[s], model.strides[s] if i == 0 else 1,
                                        groups.get(layer, 1)))
                    layer += 1
                setattr(self, f"stage{s}", tnn.Sequential(*blocks))
            self.linear = tnn.Linear(w[4], model.num_classes)

        def forward(self, x):
            for s in range(5):
                x = getattr(self, f"stage{s}")(x)
            return self.linear(x.mean((2, 3)))

    return torch, Net().eval()


@pytest.mark.parametrize("name", ["repvgg_tiny", "repvgg_tiny_se"])
def test_official_torch_layout_logits(name):
    """A PyTorch RepVGG (train form, randomized BN, eval) -> from_torch -> same logits; then repjax's
    reparameterize -> to_torch loads strictly into a PyTorch deploy model with the same logits."""
    model = create(name)
    torch, net = _torch_repvgg(model, deploy=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.2, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    x = np.random.default_rng(0).normal(size=X_SHAPE).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    variables = rv.from_torch(net.state_dict(), rv.infer_model(net.state_dict()))
    out = jax.jit(model.apply)(variables, jnp.asarray(x))
    assert rel_err(out, ref) < REL_TOL, rel_err(out, ref)

    _, net_d = _torch_repvgg(model, deploy=True)
    net_d.load_state_dict({k: torch.from_numpy(v)
                           for k, v in rv.to_torch(rv.reparameterize(variables), create(name, deploy=True)).items()},
                          strict=True)
    with torch.no_grad():
        out_d = net_d(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    assert rel_err(out_d, ref) < REL_TOL, rel_err(out_d, ref)
