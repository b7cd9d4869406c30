"""PyTorch importer: layout converters, strict errors, round trips, and logits parity with PyTorch."""

import importlib.util
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import io
from repjax.io import torch as tio
from repjax.models import resnet_cifar
from repjax.nn.layers import torch_padding

REPO = pathlib.Path(__file__).resolve().parents[1]


def _torch_reference():
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("torch_reference", REPO / "experiments" / "torch_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_variables(model, seed=0, shape=(1, 32, 32, 3)):
    """model.init with random (non-trivial) BN affine params and running statistics."""
    variables = jax.jit(model.init, static_argnames="train")(jax.random.key(seed), jnp.zeros(shape), train=False)
    leaves, treedef = jax.tree.flatten(variables)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(a) if a.ndim > 1 else rng.uniform(0.5, 1.5, a.shape).astype(np.float32) for a in leaves]
    return jax.tree.unflatten(treedef, leaves)


# ------------------------------------------------------------------ converters


@pytest.mark.parametrize(("cin", "cout", "groups", "stride"), [(4, 6, 1, 1), (4, 6, 2, 2), (6, 12, 6, 1)])
def test_conv_kernel_matches_torch(cin, cout, groups, stride):
    torch = pytest.importorskip("torch")
    w = np.random.default_rng(0).normal(size=(cout, cin // groups, 3, 3)).astype(np.float32)
    x = np.random.default_rng(1).normal(size=(2, cin, 8, 8)).astype(np.float32)
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=1,
                                      groups=groups).numpy()
    conv = nn.Conv(cout, (3, 3), strides=stride, padding=torch_padding(3), feature_group_count=groups,
                   use_bias=False)
    got = conv.apply({"params": {"kernel": tio.conv_kernel(w)}}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-5)
    np.testing.assert_array_equal(tio.conv_kernel_to_torch(tio.conv_kernel(w)), w)


def test_linear_kernel():
    w = np.arange(6.0).reshape(2, 3)
    assert tio.linear_kernel(w).shape == (3, 2)
    np.testing.assert_array_equal(tio.linear_kernel(tio.linear_kernel(w)), w)
    with pytest.raises(ValueError):
        tio.linear_kernel(np.zeros((2, 3, 1)))


# ------------------------------------------------------------------ round trips and strictness


RESNET20 = resnet_cifar.resnet20()


@pytest.fixture(scope="module")
def resnet20_vars():
    return _random_variables(RESNET20)


def test_round_trip_exact(resnet20_vars):
    sd = resnet_cifar.to_torch(resnet20_vars, RESNET20)
    assert sd["conv1.weight"].shape == (16, 3, 3, 3) and sd["linear.weight"].shape == (10, 64)
    counters = [k for k in sd if k.endswith(".num_batches_tracked")]
    assert len(sd) - len(counters) == 97 and len(counters) == 19  # the akamaster key set, one counter per BN
    chex.assert_trees_all_equal(resnet_cifar.from_torch(sd, RESNET20), resnet20_vars)


def test_npz_round_trip(tmp_path, resnet20_vars):
    sd = resnet_cifar.to_torch(resnet20_vars, RESNET20)
    tio.save_state_dict(tmp_path / "w.npz", sd)
    chex.assert_trees_all_equal(tio.load_state_dict(tmp_path / "w.npz"), sd)
    with pytest.raises(ValueError, match="format"):
        tio.load_state_dict(tmp_path / "w.bin")


def test_pth_checkpoint(tmp_path, resnet20_vars):
    torch = pytest.importorskip("torch")
    sd = resnet_cifar.to_torch(resnet20_vars, RESNET20)
    wrapped = {"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}, "best_prec1": 91.7}
    torch.save(wrapped, tmp_path / "w.th")
    chex.assert_trees_all_equal(tio.load_state_dict(tmp_path / "w.th"), sd)
    # Through the registry: the file's form and head size, for config.init.path and repjax.eval.
    model, variables = io.load_model(tmp_path / "w.th", "resnet20", num_classes=100)
    assert model == RESNET20
    chex.assert_trees_all_equal(variables, resnet20_vars)
    with pytest.raises(tio.WeightImportError, match=r"missing torch keys \(60\)"):  # another depth: strict
        io.load_variables(tmp_path / "w.th", "resnet32")


def test_strict_errors(resnet20_vars):
    sd = resnet_cifar.to_torch(resnet20_vars, RESNET20)
    resnet_cifar.from_torch({**sd, "bn1.num_batches_tracked": np.array(5)}, RESNET20)  # explicitly ignored

    missing = {k: v for k, v in sd.items() if k != "layer2.1.bn1.running_var"}
    with pytest.raises(tio.WeightImportError, match=r"missing torch keys \(1\):\n    layer2.1.bn1.running_var"):
        resnet_cifar.from_torch(missing, RESNET20)

    with pytest.raises(tio.WeightImportError, match=r"unexpected torch keys \(1\):\n    fc.weight"):
        resnet_cifar.from_torch({**sd, "fc.weight": np.zeros((10, 64))}, RESNET20)

    with pytest.raises(tio.WeightImportError, match=r"'module\.' prefix"):  # prefixed only in part
        resnet_cifar.from_torch({**sd, "module.fc.weight": np.zeros((10, 64))}, RESNET20)

    bad = {**sd, "layer3.0.conv2.weight": np.zeros((64, 32, 3, 3), np.float32)}
    with pytest.raises(tio.WeightImportError, match=r"layer3.0.conv2.weight \(64, 32, 3, 3\) -> params/stage3_block0"
                                                    r"/conv_bn2/conv/kernel: converted \(3, 3, 32, 64\), expected"):
        resnet_cifar.from_torch(bad, RESNET20)

    with pytest.raises(tio.WeightImportError, match="flax leaves not filled"):
        tio.from_torch_state_dict(sd, resnet_cifar.torch_rules(RESNET20)[2:], resnet20_vars,
                                  ignore=("conv1.*", "bn1.*"))

    with pytest.raises(tio.WeightImportError, match="duplicate torch keys"):
        rules = resnet_cifar.torch_rules(RESNET20)
        tio.from_torch_state_dict(sd, [*rules, rules[0]], resnet20_vars)


def test_export_strict(resnet20_vars):
    extra = {**resnet20_vars, "params": {**resnet20_vars["params"], "extra": {"kernel": np.zeros(3)}}}
    with pytest.raises(tio.WeightImportError, match=r"flax leaves without a rule \(1\):\n    params/extra/kernel"):
        resnet_cifar.to_torch(extra, RESNET20)


# ------------------------------------------------------------------ parity with the PyTorch reference


def _parity(variables, model, torch_model, seed=0, batch=4):
    import torch

    x = np.random.default_rng(seed).normal(size=(batch, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(jax.jit(model.apply, static_argnames="train")(variables, x, train=False))
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    return got


def test_parity_random_weights():
    tr = _torch_reference()
    model = resnet_cifar.ResNetCifar(depth=8, num_classes=5, width=2)
    variables = _random_variables(model, seed=3)
    torch_model = tr.from_state_dict(resnet_cifar.to_torch(variables, model))  # strict load: same key names
    _parity(variables, model, torch_model)


@pytest.mark.shared_data
@pytest.mark.parametrize("depth", [20, 56])
def test_parity_real_weights(depth, shared_weights):
    tr = _torch_reference()
    sd = tio.load_state_dict(shared_weights / f"resnet{depth}_cifar10_akamaster.npz")
    model = resnet_cifar.ResNetCifar(depth=depth)
    variables = resnet_cifar.from_torch(sd, model)
    logits = _parity(variables, model, tr.from_state_dict(sd))
    assert logits.std() > 1.0  # trained weights give confident, non-degenerate logits
