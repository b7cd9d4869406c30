"""PETL hosts on the ViT: identity at initialisation, exact merges, trainable-parameter arithmetic for ViT-B."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import models, optim
from repjax.models import abstract_variables, vit
from repjax.nn import petl

IDENTITY_KINDS = ("adapter", "adaptformer", "lora", "repadapter", "bitfit", "ssf")


def _apply(model, variables, x):
    return jax.jit(lambda v, a: model.apply(v, a))(variables, x)


def _random_like(tree, seed, scale=0.2, ones=False):
    """N(0, scale^2) leaves of `tree`'s shapes (numpy: no per-shape JAX random compiles), 1-D ones around 1."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale
                                              + (1.0 if ones and len(x.shape) == 1 else 0.0), jnp.float32), tree)


def _shapes(model):
    """The variables' tree (shapes only, no init compile): every test gives it random values."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))


@pytest.fixture(scope="module")
def backbone():
    model = models.create("vit_test")
    v = {"params": _random_like(_shapes(model)["params"], 1, ones=True)}  # LayerNorm scales around 1
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 3)), jnp.float32)
    return model, v, x


@pytest.mark.parametrize("kind", IDENTITY_KINDS)
def test_host_is_identity_at_init_and_then_matters(backbone, kind):
    model, v, x = backbone
    host = model.clone(petl=dict(kind=kind))
    hv = vit.attach_backbone(v, host, rng=3, fresh=None)  # keep the backbone's classifier
    # equal up to float32 rounding: the host's identity ops change how XLA fuses (and contracts) the rest
    np.testing.assert_allclose(_apply(host, hv, x), _apply(model, v, x), rtol=2e-6, atol=1e-6)
    # The host is wired in: perturbing its parameters changes the logits.
    mask = optim.trainable_mask(hv["params"], [(petl.host_regex(kind), {}), (".*", {"frozen": True})])
    moved = jax.tree.map(lambda p, m, r: p + r if m else p, hv["params"], mask, _random_like(hv["params"], 4))
    assert not np.allclose(_apply(host, {"params": moved}, x), _apply(model, v, x), atol=1e-3)


def test_vpt_deep_prompts_are_attended_from_the_start(backbone):
    """VPT-deep is not the identity at initialisation (documented exception): prompts join the attention."""
    model, v, x = backbone
    host = model.clone(petl=dict(kind="vpt", length=3))
    hv = vit.attach_backbone(v, host, rng=3, fresh=None)
    assert hv["params"]["blocks_2"]["prompts"].shape == (3, 32)
    out = _apply(host, hv, x)
    assert out.shape == (2, 10) and not np.allclose(out, _apply(model, v, x), atol=1e-4)


@pytest.mark.parametrize("spec,arch", [
    (dict(kind="repadapter", groups=2, scale=0.5), dict()), (dict(kind="repadapter", groups=1), dict(pool="gap")),
    (dict(kind="ssf"), dict()), (dict(kind="ssf"), dict(pool="gap", gap_norm="pooled")),
    (dict(kind="lora", scale=2.0), dict()), (dict(kind="bitfit"), dict())])
def test_merge_is_exact_in_fp32(backbone, spec, arch):
    model, v, x = backbone
    model = model.clone(**arch)
    v = _random_like(_shapes(model), 0)  # replaced below: only the backbone's layout matters
    host = model.clone(petl=spec)
    hv = vit.attach_backbone(v, host, rng=3, fresh=None)
    hv = {"params": _random_like(hv["params"], 5, ones=True)}  # random host parameters (not the zero init)
    merged = vit.merge_petl(hv, host)
    plain = vit.deploy(host)
    assert plain.petl is None
    assert jax.tree.structure(merged) == jax.tree.structure(abstract_variables(plain, 16))
    np.testing.assert_allclose(_apply(plain, merged, x), _apply(host, hv, x), atol=2e-5, rtol=1e-5)


def test_non_linear_hosts_do_not_merge(backbone):
    model, v, _ = backbone
    host = model.clone(petl=dict(kind="adapter"))
    assert vit.deploy(host) is host
    with pytest.raises(ValueError, match="cannot be merged"):
        vit.merge_petl(vit.attach_backbone(v, host), host)


# Spec section 4.1 (Adapter, LoRA, RepAdapter) and the module docstring (the others), classifier excluded.
VIT_B_TRAINABLE = {
    "adapter": 12 * 13_064,  # 0.157 M
    "adaptformer": 12 * 13_064,
    "lora": 12 * 24_576,  # 0.295 M
    "repadapter": 12 * 2 * 9_992,  # 0.240 M
    "bitfit": 12 * 8_448 + 768 + 768,
    "ssf": 12 * 16_896 + 2 * 768 + 2 * 768,
    "vpt": 12 * 10 * 768,
}


@pytest.mark.parametrize("kind", sorted(VIT_B_TRAINABLE))
def test_trainable_parameters_of_vit_b(kind):
    model = models.create("vit_b16", num_classes=100, petl=dict(kind=kind))
    params = abstract_variables(model, 224)["params"]  # shapes only: nothing of ViT-B's size is allocated
    mask = optim.trainable_mask(params, petl.optim_rules(kind))
    count = sum(int(np.prod(p.shape)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
    assert count - (768 * 100 + 100) == VIT_B_TRAINABLE[kind]


def test_config_errors():
    with pytest.raises(ValueError, match="petl kind must be"):
        petl.parse(dict(kind="prefix"), 12)
    with pytest.raises(ValueError, match="no options"):
        petl.parse(dict(kind="lora", groups=2), 12)
    with pytest.raises(ValueError, match="per-block rates"):
        petl.parse(dict(kind="adapter", dropout=(0.1, 0.2)), 12)
    cfg = petl.parse(dict(kind="repadapter", dropout=[0.3] * 6 + [0.1] * 6), 12)
    assert cfg.rate(0) == 0.3 and cfg.rate(11) == 0.1 and cfg.groups == 2


def test_attach_backbone_is_strict(backbone):
    model, v, _ = backbone
    host = model.clone(petl=dict(kind="adapter"), depth=5)
    with pytest.raises(ValueError, match="missing from backbone"):
        vit.attach_backbone(v, host)
