"""Torch-free, whitelist-only reader of PyTorch zip checkpoints: parity with torch.load, and refusal of
pickles that reference anything else (checked without torch, on files built by hand)."""

import collections
import os
import pathlib
import pickle
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from repjax.io import torch as tio, torch_zip
from repjax.io.torch_zip import TorchZipError, UnsafePickleError

# ----------------------------------------------------------------------------------------------------------
# Hand-built archives (same layout as torch.save), written opcode by opcode: no torch needed.


def _write_archive(path, pkl: bytes, storages: dict[str, bytes], byteorder: str | None = "little") -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", "3\n")


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def _int(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little", signed=True)


def _tuple(items) -> bytes:
    return b"(" + b"".join(_int(i) for i in items) + b"t"


def _tensor(storage_type: str, key: str, numel: int, offset: int, size, stride) -> bytes:
    """`torch._utils._rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())`."""
    pid = b"(" + _str("storage") + _global("torch", storage_type) + _str(key) + _str("cpu") + _int(numel) + b"tQ"
    args = pid + _int(offset) + _tuple(size) + _tuple(stride) + b"\x89" + _global("collections", "OrderedDict")
    return _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b")RtR"


def _dict_pickle(entries: dict[str, bytes]) -> bytes:
    return b"\x80\x02}" + b"".join(_str(k) + v + b"s" for k, v in entries.items()) + b"."


def test_hand_built_archive_little_and_big_endian_views(tmp_path):
    base = np.arange(12, dtype=np.float32)
    pkl = _dict_pickle({
        "full": _tensor("FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
        "transposed": _tensor("FloatStorage", "0", 12, 0, (4, 3), (1, 4)),
        "window": _tensor("FloatStorage", "0", 12, 5, (2, 2), (4, 1)),
        "scalar": _tensor("LongStorage", "1", 2, 1, (), ()),
        "empty": _tensor("HalfStorage", "2", 0, 0, (0, 3), (3, 1)),
    })
    ints = np.array([7, -9], np.int64)
    for order, code in (("little", "<"), ("big", ">")):
        path = tmp_path / f"{order}.pth"
        _write_archive(path, pkl, {"0": base.astype(code + "f4").tobytes(), "1": ints.astype(code + "i8").tobytes(),
                                   "2": b""}, byteorder=order)
        sd = torch_zip.load_state_dict(path)
        grid = base.reshape(3, 4)
        np.testing.assert_array_equal(sd["full"], grid)
        np.testing.assert_array_equal(sd["transposed"], grid.T)
        np.testing.assert_array_equal(sd["window"], grid[1:, 1:3])
        assert sd["scalar"].shape == () and sd["scalar"] == -9 and sd["scalar"].dtype == np.int64
        assert sd["empty"].shape == (0, 3) and sd["empty"].dtype == np.float16
        assert all(v.dtype.isnative and v.flags.c_contiguous for v in sd.values())


def test_missing_byteorder_means_little_endian(tmp_path):
    path = tmp_path / "old.pth"
    _write_archive(path, _dict_pickle({"w": _tensor("IntStorage", "0", 3, 0, (3,), (1,))}),
                   {"0": np.array([1, 2, 3], "<i4").tobytes()}, byteorder=None)
    np.testing.assert_array_equal(torch_zip.load_state_dict(path)["w"], [1, 2, 3])


class _Exploit:
    """Pickles as `os.system('touch <marker>')`: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_global_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _write_archive(path, pickle.dumps({"w": _Exploit(marker)}, protocol=2), {})
    with pytest.raises(UnsafePickleError, match=r"'(posix|os|nt)\.system'"):
        torch_zip.load(path, strict=True)
    assert not marker.exists()
    # By default the call becomes an inert placeholder that records its arguments: still nothing runs.
    inert = torch_zip.load(path)["w"]
    assert isinstance(inert, torch_zip.Opaque) and inert.global_name in ("posix.system", "os.system", "nt.system")
    assert inert.args == (f"touch {marker}",)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match=r"w \((posix|os|nt)\.system, not executed\)"):
        torch_zip.load_state_dict(path)
    assert not marker.exists()
    # Also inside an otherwise valid state_dict, and for builtins such as eval.
    evil = _global("builtins", "eval") + b"(" + _str("1+1") + b"tR"
    _write_archive(path, _dict_pickle({"w": _tensor("FloatStorage", "0", 1, 0, (1,), (1,)), "x": evil}),
                   {"0": np.zeros(1, np.float32).tobytes()})
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        torch_zip.load_state_dict(path)
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        torch_zip.load(path, strict=True)


def test_out_of_bounds_view_and_missing_storage_are_errors(tmp_path):
    path = tmp_path / "bad.pth"
    _write_archive(path, _dict_pickle({"w": _tensor("FloatStorage", "0", 4, 2, (2, 2), (2, 1))}),
                   {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(TorchZipError, match="exceeds its storage"):
        torch_zip.load(path)
    _write_archive(path, _dict_pickle({"w": _tensor("FloatStorage", "7", 4, 0, (4,), (1,))}), {})
    with pytest.raises(TorchZipError, match="missing"):
        torch_zip.load(path)
    path.write_bytes(b"\x80\x02}q\x00.")  # a bare pickle: legacy format
    with pytest.raises(TorchZipError, match="not a zip-format"):
        torch_zip.load(path)


# ----------------------------------------------------------------------------------------------------------
# Parity with real torch.save files.


def _torch_tensors(torch):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=g)
    return collections.OrderedDict(
        conv=torch.randn(4, 3, 3, 3, generator=g),
        transposed=base.t(),  # non-contiguous view
        window=base[1:4, 2:5],  # offset + strides into a shared storage
        half=torch.randn(7, generator=g).half(),
        bf16=torch.randn(3, 2, generator=g).bfloat16(),
        double=torch.randn(2, generator=g).double(),
        long=torch.arange(-3, 5),
        int=torch.arange(6, dtype=torch.int32).reshape(2, 3),
        byte=torch.arange(250, 256, dtype=torch.uint8),
        mask=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        param=torch.nn.Parameter(torch.ones(2, 2)),
    )


def _as_numpy(torch, t):
    t = t.detach()
    return t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def test_matches_torch_load_for_dtypes_views_and_parameters(tmp_path):
    torch = pytest.importorskip("torch")
    tensors = _torch_tensors(torch)
    path = tmp_path / "sd.pth"
    torch.save(tensors, path)
    sd = torch_zip.load_state_dict(path)
    assert list(sd) == list(tensors)
    for k, t in tensors.items():
        want = _as_numpy(torch, t)
        assert sd[k].dtype == want.dtype and sd[k].shape == want.shape, k
        np.testing.assert_array_equal(sd[k], want, err_msg=k)
    assert torch_zip.load_state_dict(path, upcast_bfloat16=True)["bf16"].dtype == np.float32


def test_nested_checkpoints_module_state_dict_and_other_values(tmp_path):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    ref = net.state_dict()  # OrderedDict carrying `_metadata`
    for i, wrapped in enumerate([{"state_dict": ref, "epoch": 3},
                                 {"model": collections.OrderedDict(("module." + k, v) for k, v in ref.items())}]):
        path = tmp_path / f"ckpt{i}.pth"
        torch.save(wrapped, path)
        sd = torch_zip.load_state_dict(path)
        assert list(sd) == list(ref)
        for k, v in ref.items():
            np.testing.assert_array_equal(sd[k], v.numpy())
            assert sd[k].shape == tuple(v.shape)
    whole = torch_zip.load(tmp_path / "ckpt0.pth")
    assert whole["epoch"] == 3 and isinstance(whole["state_dict"], collections.OrderedDict)


def test_repjax_load_state_dict_without_torch(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    tensors = _torch_tensors(torch)
    path = tmp_path / "sd.pth"
    torch.save({"state_dict": tensors}, path)
    with_torch = tio.load_state_dict(path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    without = tio.load_state_dict(path)
    assert list(without) == list(with_torch)
    for k in with_torch:
        assert without[k].dtype == with_torch[k].dtype, k
        np.testing.assert_array_equal(without[k], with_torch[k])


# ----------------------------------------------------------------------------------------------------------
# Sizes checked against the pickled metadata before reading; bounded memory; damaged files.


def test_storage_size_must_match_metadata_before_reading(tmp_path):
    path = tmp_path / "short.pth"
    pkl = _dict_pickle({"w": _tensor("FloatStorage", "0", 4, 0, (4,), (1,))})
    _write_archive(path, pkl, {"0": np.zeros(3, np.float32).tobytes()})  # 12 bytes, metadata says 16
    with pytest.raises(TorchZipError, match=r"storage '0' holds 12 bytes, but its tensor metadata says 4 x 4 = 16"):
        torch_zip.load(path)
    _write_archive(path, pkl, {"0": np.zeros(1000, np.float32).tobytes()})  # more than the metadata: also refused
    with pytest.raises(TorchZipError, match=r"holds 4000 bytes"):
        torch_zip.load(path)


def test_small_file_inflating_to_gigabytes_is_refused_without_reading_it(tmp_path):
    import tracemalloc

    path = tmp_path / "bomb.pth"
    numel = 64 * 2**20 // 4  # 64 MiB of zeros: deflates to ~64 KiB
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", _dict_pickle({"w": _tensor("FloatStorage", "0", numel, 0, (numel,), (1,))}))
        with z.open("archive/data/0", "w") as f:
            chunk = bytes(2**20)
            for _ in range(64):
                f.write(chunk)
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(TorchZipError, match=r"inflates to more than .* entry 'archive/data/0' alone is 67108864"):
            torch_zip.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # the 64 MiB entry was never read
    assert torch_zip.load(path, max_inflation=1e6)["w"].shape == (numel,)  # a trusted re-compressed file


def test_truncated_or_corrupted_archive_names_the_file(tmp_path):
    path = tmp_path / "w.pth"
    _write_archive(path, _dict_pickle({"w": _tensor("FloatStorage", "0", 256, 0, (256,), (1,))}),
                   {"0": np.arange(256, dtype=np.float32).tobytes()})
    raw = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TorchZipError, match=r"cut\.pth' is a truncated or damaged zip"):
        torch_zip.load(cut)
    flipped = bytearray(raw)
    at = raw.index(np.arange(256, dtype=np.float32).tobytes()) + 100
    flipped[at] ^= 0xFF
    bad = tmp_path / "flipped.pth"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(TorchZipError, match=r"flipped\.pth' is damaged: entry 'archive/data/0'"):
        torch_zip.load(bad)


# ----------------------------------------------------------------------------------------------------------
# Training checkpoints that pickle their config object (argparse.Namespace, custom classes): tensors read,
# the objects left inert.


class _TrainConfig:
    """A custom config class; unpickling it for real would run `__setstate__` (which leaves a marker)."""

    def __init__(self, marker):
        self.marker, self.lr, self.epochs = str(marker), 0.1, 240

    def __setstate__(self, state):
        pathlib.Path(state["marker"]).touch()
        self.__dict__.update(state)


def test_checkpoint_with_pickled_config_objects(tmp_path):
    import argparse

    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    weights = collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.ones(2))
    ckpt = {"model": weights, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 3,
            "args": argparse.Namespace(arch="RepOpt-VGG-B1", lr=0.1, scales_path=None),
            "config": _TrainConfig(marker)}
    path = tmp_path / "hs.pth"
    torch.save(ckpt, path)
    sd = tio.load_state_dict(path)
    assert list(sd) == ["w", "b"]
    np.testing.assert_array_equal(sd["w"], np.arange(6.0).reshape(2, 3))
    whole = torch_zip.load(path)
    args, config = whole["args"], whole["config"]
    assert isinstance(args, torch_zip.Opaque) and args.global_name == "argparse.Namespace"
    assert args.state == {"arch": "RepOpt-VGG-B1", "lr": 0.1, "scales_path": None}
    assert config.global_name.endswith("_TrainConfig") and config.state["epochs"] == 240
    assert not marker.exists()  # the class's code never ran
    with pytest.raises(UnsafePickleError, match=r"argparse\.Namespace"):
        torch_zip.load(path, strict=True)


def test_torch_path_never_advises_weights_only_false(tmp_path):
    import argparse

    torch = pytest.importorskip("torch")
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(tio.WeightImportError, match=r"refusing .*legacy\.pth.*never runs code") as info:
        tio.load_state_dict(path)
    assert "weights_only=False" not in str(info.value)
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(tio.load_state_dict(path)["w"], [1, 1])


# ----------------------------------------------------------------------------------------------------------
# Non-finite weights are refused at read time, naming the key, in every format.


def test_nan_or_inf_weights_are_refused_naming_the_key(tmp_path):
    good = {"conv.weight": np.ones((2, 2), np.float32), "bn.num_batches_tracked": np.array(3)}
    bad = {**good, "head.bias": np.array([0.0, np.nan, np.inf, -np.inf], np.float32)}
    tio.save_state_dict(tmp_path / "bad.npz", bad)
    with pytest.raises(tio.WeightImportError, match=r"bad\.npz.*\n.*NaN or inf \(1\):\n    head\.bias \(4,\): "
                                                    r"1 NaN, 2 inf"):
        tio.load_state_dict(tmp_path / "bad.npz")
    assert set(tio.load_state_dict(tmp_path / "bad.npz", allow_nonfinite=True)) == set(bad)
    pkl = _dict_pickle({"ok": _tensor("FloatStorage", "0", 2, 0, (2,), (1,)),
                        "bf": _tensor("BFloat16Storage", "1", 2, 0, (2,), (1,))})
    _write_archive(tmp_path / "bad.pth", pkl, {"0": np.ones(2, np.float32).tobytes(),
                                               "1": np.array([1, np.inf], ml_dtypes.bfloat16).tobytes()})
    with pytest.raises(tio.WeightImportError, match=r"    bf \(2,\): 0 NaN, 1 inf"):
        tio.load_state_dict(tmp_path / "bad.pth")
    tio.save_state_dict(tmp_path / "good.npz", good)
    assert set(tio.load_state_dict(tmp_path / "good.npz")) == set(good)
