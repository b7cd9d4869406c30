"""`repjax.eval`: a trained checkpoint and imported PyTorch weights."""

import pytest

from repjax import config as config_lib, train as train_lib
from repjax.eval import evaluate
from repjax.models import small_cnn


def test_eval_of_checkpoint_matches_training_summary(tmp_path):
    config = config_lib.defaults()
    config.total_steps, config.batch_size, config.log_every_steps = 10, 32, 5
    result = train_lib.train(config, tmp_path)
    metrics = evaluate(config, workdir=str(tmp_path), throughput=False)
    assert metrics["step"] == 10
    assert metrics["top1"] == pytest.approx(result["test/top1"], abs=1e-9)
    assert metrics["examples"] == metrics["count"] == 300
    # The family's analytic MACs of the 8x8x1 digits model. XLA's count (2 FLOPs a MAC) skips the taps on zero
    # padding (a quarter of them on these 8x8 and 4x4 maps) and adds BN, ReLU and pooling.
    assert metrics["macs_analytic"] == small_cnn.macs(small_cnn.small_cnn(), 8, 8, in_channels=1)
    assert 0.5 * metrics["macs_analytic"] < metrics["xla_flops_reference"] / 2 < metrics["macs_analytic"]


def test_eval_without_weights_or_checkpoint_fails(tmp_path):
    with pytest.raises(ValueError, match="Nothing to evaluate"):
        evaluate(config_lib.defaults())
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        evaluate(config_lib.defaults(), workdir=str(tmp_path))


@pytest.mark.slow
def test_imported_resnet20_on_shared_cifar10(shared_data, shared_weights):
    """The akamaster ResNet-20 scores 81.03% on the shared (JPEG) test split in PyTorch: same here."""
    config = config_lib.load("configs/resnet_cifar10_pretrained.py:depth=20")
    config.data.source = f"folder:{shared_data / 'cifar10'}"
    config.init.path = str(shared_weights / "resnet20_cifar10_akamaster.npz")
    metrics = evaluate(config, throughput=False)
    assert metrics["count"] == 10_000
    assert metrics["top1"] == pytest.approx(0.8103, abs=5e-4)
