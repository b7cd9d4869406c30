"""Bad configuration fails before any work, with a message naming the key."""

import pytest

from repjax import cli, config as config_lib


def test_unknown_override_suggests_close_key(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--config.optim.lrr=0.1"], need_workdir=False)
    assert e.value.code == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_wrong_type_override(capsys):
    with pytest.raises(SystemExit):
        cli.parse(["--config.total_steps=abc"], need_workdir=False)
    assert "total_steps" in capsys.readouterr().err


def test_overrides_apply_with_types():
    config, _ = cli.parse(["--config.optim.lr=1", "--config.data.source=synthetic:8x8x3,64,10",
                           "--config.sharding_rules=[('.*kernel', 'fsdp')]"], need_workdir=False)
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.data.source == "synthetic:8x8x3,64,10"
    assert list(config.sharding_rules[0]) == [".*kernel", "fsdp"]


def test_free_form_blocks_accept_new_keys():
    config, _ = cli.parse(["--config.model.kwargs.width=2"], need_workdir=False)
    assert config.model.kwargs.width == 2


def test_validate_rejects_unknown_and_mistyped_keys():
    config = config_lib.defaults()
    config.optim.learning_rate = 0.1
    config.seeds = 1
    with pytest.raises(ValueError) as e:
        config_lib.validate(config)
    assert "optim.learning_rate" in str(e.value) and "did you mean 'optim.lr'" in str(e.value)
    assert "'seeds'" in str(e.value)
    with pytest.raises(TypeError, match="batch_size"):  # ConfigDict itself type-checks assignments
        config.batch_size = "big"


def test_config_file_and_argument(tmp_path):
    config = config_lib.load("configs/resnet_cifar10.py:depth=56,epochs=2")
    assert config.model.name == "resnet56"
    assert config.epochs == 2 and config.total_steps == 0  # steps come from the training split's size
    assert config_lib.resolve_epochs(config, 50_000).total_steps == 2 * (50_000 // 128)
    with pytest.raises(ValueError, match="Unknown config argument 'dpth'"):
        config_lib.load("configs/resnet_cifar10.py:dpth=56")
    with pytest.raises(FileNotFoundError):
        config_lib.load(str(tmp_path / "nope.py"))
