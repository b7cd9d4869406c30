"""FGSM / PGD against foolbox (an independent implementation) on the same weights exported to PyTorch; eps=0
gives clean accuracy; the registered evaluator end to end."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import config as config_lib, evals, models, sharding
from repjax.projects.lkrobust import attacks, inputs

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


class TinyNet(nn.Module):
    """conv3x3(6) - relu - conv3x3(8) - relu - global mean - dense(5); written again in PyTorch below."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)), name="c1")(x))
        x = nn.relu(nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="c2")(x))
        return nn.Dense(5, name="fc")(jnp.mean(x, axis=(1, 2)))


def _torch_twin(params):
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    net = tnn.Sequential(tnn.Conv2d(3, 6, 3, padding=1), tnn.ReLU(), tnn.Conv2d(6, 8, 3, padding=1), tnn.ReLU(),
                         tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(8, 5))
    p = jax.tree.map(np.asarray, params)
    with torch.no_grad():
        for i, name in ((0, "c1"), (2, "c2")):
            net[i].weight.copy_(torch.from_numpy(p[name]["kernel"].transpose(3, 2, 0, 1).copy()))
            net[i].bias.copy_(torch.from_numpy(p[name]["bias"].copy()))
        net[6].weight.copy_(torch.from_numpy(p["fc"]["kernel"].T.copy()))
        net[6].bias.copy_(torch.from_numpy(p["fc"]["bias"].copy()))
    return net.eval()


@pytest.fixture(scope="module")
def twin():
    model = TinyNet()
    x = np.random.default_rng(0).random((32, 12, 12, 3), dtype=np.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x))
    fn = inputs.logits_fn(model, variables, 1 / STD, -MEAN / STD)
    labels = np.asarray(jnp.argmax(fn(jnp.asarray(x)), -1))
    return fn, variables, x, labels


def _foolbox(net, attack, x, labels, eps):
    torch = pytest.importorskip("torch")
    fb = pytest.importorskip("foolbox")
    fmodel = fb.PyTorchModel(net, bounds=(0, 1), preprocessing={"mean": MEAN.tolist(), "std": STD.tolist(),
                                                                "axis": -3})
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    _, adv, _ = attack(fmodel, xt, torch.from_numpy(labels.astype(np.int64)), epsilons=[eps])
    return adv[0].numpy().transpose(0, 2, 3, 1)


def test_logits_match_torch(twin):
    torch = pytest.importorskip("torch")
    fn, variables, x, _ = twin
    net = _torch_twin(variables["params"])
    with torch.no_grad():
        ref = net((torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) - torch.tensor(MEAN)[:, None, None])
                  / torch.tensor(STD)[:, None, None]).numpy()
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["fgsm", "pgd"])
def test_adversarial_images_match_foolbox(twin, kind):
    fb = pytest.importorskip("foolbox")
    fn, variables, x, labels = twin
    net = _torch_twin(variables["params"])
    eps = 0.03
    if kind == "fgsm":
        ours = np.asarray(attacks.fgsm(fn, jnp.asarray(x), jnp.asarray(labels), eps))
        ref = _foolbox(net, fb.attacks.FGSM(), x, labels, eps)
    else:  # deterministic start: the iterates must agree
        ours = np.asarray(attacks.pgd(fn, jnp.asarray(x), jnp.asarray(labels), eps, eps / 4, 5))
        ref = _foolbox(net, fb.attacks.LinfPGD(abs_stepsize=eps / 4, steps=5, random_start=False), x, labels, eps)
    # equal up to float32 (a gradient component within rounding of 0 may take the other sign)
    assert np.mean(np.abs(ours - ref) > 1e-5) < 2e-3
    assert np.max(np.abs(ours - x)) <= eps + 1e-6 and ours.min() >= 0 and ours.max() <= 1


def test_random_start_pgd_in_distribution(twin):
    fb = pytest.importorskip("foolbox")
    fn, variables, x, labels = twin
    net = _torch_twin(variables["params"])
    eps = 0.02
    init = jnp.asarray(attacks.uniform_init(len(x), x.shape[1:], seed=0))
    ours = np.asarray(attacks.pgd(fn, jnp.asarray(x), jnp.asarray(labels), eps, eps / 4, 5, init))
    ref = _foolbox(net, fb.attacks.LinfPGD(abs_stepsize=eps / 4, steps=5, random_start=True), x, labels, eps)
    acc = [float(np.mean(np.argmax(np.asarray(fn(jnp.asarray(a))), -1) == labels)) for a in (ours, ref)]
    assert abs(acc[0] - acc[1]) <= 0.2, acc  # 32 images, different random starts
    for a in (ours, ref):  # both use the full budget somewhere and stay inside it
        d = np.abs(a - x)
        assert d.max() <= eps + 1e-6 and np.mean(d > eps / 2) > 0.1


def test_eps_zero_is_clean_and_evaluator(tmp_path):
    config = config_lib.defaults()
    config.data.source, config.data.eval_split = "synthetic:16x16x3,12,3", "test"
    config.data.eval_pp = "normalize(imagenet)"
    config.eval_batch_size = 8
    model = models.create("small_cnn", num_classes=3, width=4)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
    mesh = sharding.make_mesh(config.mesh)
    for kind in attacks.ATTACKS:
        out = evals.get("adversarial")(model, variables, config, mesh, attack=kind, eps=(0.0, 0.05),
                                       save=str(tmp_path / kind))
        assert out["top1/0"] == out["clean_top1"] and out["flip/0"] == 0.0
        assert out["top1/0.05"] <= out["clean_top1"]
        assert (tmp_path / f"{kind}.png").exists()
