"""The family contract (`repjax.models.family`), checked on every registered family's `tiny` variant.

Parametrised over `repjax.models.families()`, so a family registered later is checked as soon as it registers.
Per family, on its tiny variant at its registered input size (batch 2, float32):
- create and init: `{'params'}` (+ `{'batch_stats'}`) from the traced init (`jax.eval_shape`: no init compile),
  and float32 logits of shape (2, num_classes) from the jitted eval-mode forward on random values of that tree;
- two forms: `reparameterize` returns exactly the tree (structure, shapes, dtypes) of `deploy(model).init`, and
  the deploy model gives the training model's eval-mode logits, max|diff| <= 1e-4 * max|logits| (randomized BN
  statistics: mean ~ N(0, 0.5), var ~ U(0.2, 2), gamma ~ U(0.5, 1.5), beta ~ N(0, 0.3));
- PyTorch layout: `from_torch(to_torch(v))` is exact and `infer` recovers the form, for both forms, directly and
  through `repjax.io.load_model` on an `.npz` (and a `.pth` when torch is installed);
- `macs(model, h, w)` equals, exactly, the multiply-adds of the convolutions and matrix products in the traced
  deploy forward with the reference depthwise algorithm (`cost.traced_macs`); XLA's FLOP count of the same
  program (`cost.inference_flops`) is within [0.5, 4] x 2 macs: it skips padding taps and adds elementwise work,
  so it is a sanity band, not the reference.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import io, models
from repjax.evals import cost
from repjax.io import torch as tio

REL_TOL = 1e-4
FAMILIES = [pytest.param(f, id=f.name) for f in models.families()]


def _setup(family):
    variant = models.variant(family.tiny)
    assert variant.family is family, f"tiny variant {family.tiny!r} belongs to {variant.family.name!r}"
    model = models.create(family.tiny)
    size = variant.input_size
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size, variant.in_channels)), jnp.float32)
    return model, x


def _abstract(model, x):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))


def _randomize(abstract, seed=0):
    """Random values on an abstract tree (numpy, no JAX init): kernels ~ N(0, 1/fan_in), BN statistics and
    affine parameters spread wide, other vectors U(0.5, 1.5) (scales) or N(0, 0.3) (biases)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = str(getattr(path[-1], "key", path[-1])), leaf.shape
        if name == "var":
            x = rng.uniform(0.2, 2.0, shape)
        elif name == "mean":
            x = rng.normal(size=shape) * 0.5
        elif len(shape) >= 2:
            x = rng.normal(size=shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif name == "bias":
            x = rng.normal(size=shape) * 0.3
        else:
            x = rng.uniform(0.5, 1.5, shape)
        return np.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _logits(model, variables, x):
    """Eval-mode logits, jitted: the same program in both tests below (compiled once per worker)."""
    return jax.jit(model.apply, static_argnames="train")(variables, x, train=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_create_and_init(family):
    model, x = _setup(family)
    abstract = _abstract(model, x)
    assert "params" in abstract and set(abstract) <= {"params", "batch_stats"}
    out = _logits(model, _randomize(abstract), x)
    assert out.shape == (2, model.num_classes) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("family", FAMILIES)
def test_reparameterize_equals_training_form(family):
    if not family.has_deploy_form:
        pytest.skip(f"{family.name} has one form")
    model, x = _setup(family)
    if family.is_deploy(model):  # ViT: two forms only with a mergeable PETL host (tests/test_petl.py)
        pytest.skip(f"{family.tiny} is already in deploy form")
    deploy = family.deploy(model)
    assert family.is_deploy(deploy) and not family.is_deploy(model)
    variables = _randomize(_abstract(model, x))
    converted = family.reparameterize(variables, model)
    chex.assert_trees_all_equal_shapes_and_dtypes(converted, _abstract(deploy, x))
    ref = _logits(model, variables, x)
    out = _logits(deploy, converted, x)
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert err <= REL_TOL, err


def _forms(family, model, x):
    """(model, variables) of each form: the training form, and the deploy form where the family has one."""
    variables = _randomize(_abstract(model, x))
    forms = [(model, variables)]
    if family.has_deploy_form:
        forms.append((family.deploy(model), jax.tree.map(np.asarray, family.reparameterize(variables, model))))
    return forms


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_round_trip_both_forms(family):
    if family.from_torch is None:
        pytest.skip(f"{family.name} has no PyTorch layout")
    model, x = _setup(family)
    for form, variables in _forms(family, model, x):
        sd = family.to_torch(variables, form)
        assert all(isinstance(v, np.ndarray) for v in sd.values())
        assert family.infer_model(sd, model) == form  # the form is read off the keys
        chex.assert_trees_all_equal(family.from_torch(sd, form), variables)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_model_through_a_file(family, tmp_path):
    """`repjax.io.load_model(path, name)` (what `config.init.path` and `repjax.eval` use) returns the module in
    the file's form with exactly the exported variables; `.pth` too when torch is installed."""
    if family.from_torch is None:
        pytest.skip(f"{family.name} has no PyTorch layout")
    model, x = _setup(family)
    for i, (form, variables) in enumerate(_forms(family, model, x)):
        sd = family.to_torch(variables, form)
        path = tmp_path / f"form{i}.npz"
        tio.save_state_dict(path, sd)
        loaded, got = io.load_model(path, family.tiny)
        assert loaded == form
        chex.assert_trees_all_equal(got, variables)
        chex.assert_trees_all_equal(io.load_variables(path, family.tiny), variables)
    try:
        import torch
    except ImportError:
        return
    form, variables = _forms(family, model, x)[0]
    path = tmp_path / "train.pth"
    torch.save({f"module.{k}": torch.from_numpy(v) for k, v in family.to_torch(variables, form).items()}, path)
    chex.assert_trees_all_equal(io.load_variables(path, family.tiny), variables)


@pytest.mark.parametrize("family", FAMILIES)
def test_macs_count_the_deploy_forward(family):
    model, x = _setup(family)
    deploy = family.deploy(model) if family.has_deploy_form else model
    h, w, c = x.shape[1:]
    abstract = _abstract(deploy, x)
    macs = family.macs(model, h, w)
    assert isinstance(macs, int) and macs > 0
    assert cost.traced_macs(deploy, abstract, (h, w, c)) == macs
    if family.has_deploy_form:
        assert family.macs(deploy, h, w) == macs
    ratio = cost.inference_flops(deploy, abstract, (h, w, c)) / 2 / macs
    assert 0.5 <= ratio <= 4.0, ratio


def test_every_variant_names_a_family_and_load_errors_are_clear(tmp_path):
    fams = {f.name for f in models.families()}
    assert {"resnet_cifar", "small_cnn", "repvgg", "repopt_vgg", "repmlpnet"} <= fams
    with pytest.raises(FileNotFoundError, match="not found"):
        io.load_variables(tmp_path / "none.npz", "resnet20")
    tio.save_state_dict(tmp_path / "w.npz", {"a": np.zeros(1)})
    with pytest.raises(ValueError, match="no weight importer"):
        io.load_variables(tmp_path / "w.npz", "small_cnn")
    with pytest.raises(KeyError, match="Unknown model 'resnet21'"):
        io.load_variables(tmp_path / "w.npz", "resnet21")


def test_load_init_refuses_deploy_weights_for_a_training_config(tmp_path):
    """`config.init.path` holding the deploy form while the config builds the training form: a clear error."""
    from repjax import build, config as config_lib

    family = models.variant("repvgg_tiny").family
    model = models.create("repvgg_tiny")
    variables = _randomize(_abstract(model, jnp.zeros((1, 32, 32, 3))))
    deploy = family.deploy(model)
    tio.save_state_dict(tmp_path / "deploy.npz", family.to_torch(family.reparameterize(variables, model), deploy))
    config = config_lib.defaults()
    config.model.name, config.init.path = "repvgg_tiny", str(tmp_path / "deploy.npz")
    with pytest.raises(ValueError, match=r"holds the deploy form of 'repvgg_tiny'.*kwargs\.deploy=True"):
        build.load_init(config, None, None)
