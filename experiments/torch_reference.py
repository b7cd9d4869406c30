"""PyTorch reference CIFAR ResNet (option A), for import parity tests, accuracy checks and timing.

Key names follow the akamaster checkpoints (`conv1`, `bn1`, `layer{1,2,3}.{j}.{conv,bn}{1,2}`, `linear`).

Top-1 of imported weights on the shared JPEG CIFAR-10 test split:
    python experiments/torch_reference.py --weights ../shared/weights/resnet20_cifar10_akamaster.npz \
        --data ../shared/data/cifar10 --split test
"""

from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, option-A shortcut (subsample + zero channels half each side), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            s = F.pad(s, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(y + s)


class ResNetCifar(nn.Module):
    """CIFAR ResNet with depth 6n + 2, NCHW input; Kaiming-normal conv/linear init."""

    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 1):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n, widths = (depth - 2) // 6, [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for s, cout in enumerate(widths):
            blocks = [BasicBlock(cin if b == 0 else cout, cout, 2 if s and b == 0 else 1) for b in range(n)]
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
            cin = cout
        self.linear = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean(dim=(2, 3)))


def from_state_dict(state_dict: dict[str, np.ndarray]) -> ResNetCifar:
    """Builds the model matching a numpy state_dict (depth, classes, width from keys/shapes); strict; eval mode."""
    sd = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layer1."))
    model = ResNetCifar(6 * n + 2, sd["linear.weight"].shape[0], sd["conv1.weight"].shape[0] // 16)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load(weights: str | pathlib.Path) -> ResNetCifar:
    """`from_state_dict` of a file (.npz, or .pth/.th torch checkpoint)."""
    return from_state_dict(_load_state_dict(weights))


def _load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """.npz, or a torch checkpoint (plain, {'state_dict': ...}, DataParallel 'module.' keys). No repjax import."""
    if str(path).endswith(".npz"):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {k.removeprefix("module."): v.numpy() for k, v in sd.items()}


def image_folder(root: str | pathlib.Path, split: str) -> tuple[list[pathlib.Path], np.ndarray]:
    """Files and labels of an ImageFolder split (classes sorted alphabetically)."""
    classes = sorted(p.name for p in (pathlib.Path(root) / split).iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((pathlib.Path(root) / split / c).iterdir())]
    return [f for f, _ in files], np.array([i for _, i in files], np.int64)


def _decode(path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 255.0


def batches(files: list[pathlib.Path], batch_size: int, threads: int = 2) -> Iterator[torch.Tensor]:
    """Normalised NCHW float32 batches, decoded with PIL on a thread pool."""
    with ThreadPoolExecutor(threads) as pool:
        for i in range(0, len(files), batch_size):
            x = (np.stack(list(pool.map(_decode, files[i : i + batch_size]))) - MEAN) / STD
            yield torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@torch.no_grad()
def top1(model: nn.Module, root: str | pathlib.Path, split: str, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of `model` (eval mode) on an ImageFolder split."""
    files, labels = image_folder(root, split)
    model.eval()
    preds = np.concatenate([model(x).argmax(1).numpy() for x in batches(files, batch_size)])
    return 100.0 * float((preds == labels).mean())


def train_step_fn(depth: int = 20, num_classes: int = 10, lr: float = 0.1, momentum: float = 0.9,
                  weight_decay: float = 1e-4, seed: int = 0
                  ) -> tuple[ResNetCifar, Callable[[torch.Tensor, torch.Tensor], float]]:
    """A PyTorch ResNet and its SGD-momentum/cross-entropy training step, for side-by-side timing.

    The step takes NCHW float32 images and int64 labels and returns the loss (a host sync, as a logged
    JAX step would be).
    """
    torch.manual_seed(seed)
    model = ResNetCifar(depth, num_classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        return loss.item()

    return model, step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help=".npz (or .pth/.th) PyTorch state_dict")
    p.add_argument("--data", default="../shared/data/cifar10", help="ImageFolder root")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load(args.weights)
    start = time.time()
    acc = top1(model, args.data, args.split, args.batch_size)
    print(f"{pathlib.Path(args.weights).name}: top-1 {acc:.2f}% on {args.data}/{args.split} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
