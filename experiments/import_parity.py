"""Imported PyTorch CIFAR ResNets: repjax top-1 vs PyTorch top-1 with the same weights and images.

    python experiments/import_parity.py [--depths 20,56] [--out experiments/results/import_parity.json]

repjax evaluates through `repjax.eval` (its data pipeline, the strict importer, the sharded eval step);
PyTorch through the independent reference in `experiments/torch_reference.py` (its own JPEG decoding).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from repjax import config as config_lib
from repjax.eval import evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="20,56")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=str(REPO / "experiments/results/import_parity.json"))
    args = p.parse_args(argv)

    sys.path.insert(0, str(REPO / "experiments"))
    import torch_reference

    results = {}
    for depth in map(int, args.depths.split(",")):
        config = config_lib.load(str(REPO / f"configs/resnet_cifar10_pretrained.py:depth={depth}"))
        config.data.source = f"folder:{SHARED / 'data/cifar10'}"
        config.data.eval_split = args.split
        config.init.path = str(SHARED / f"weights/resnet{depth}_cifar10_akamaster.npz")
        ours = evaluate(config, throughput=False)
        theirs = torch_reference.top1(torch_reference.load(config.init.path), SHARED / "data/cifar10", args.split)
        results[f"resnet{depth}"] = {"repjax_top1": 100 * ours["top1"], "torch_top1": theirs,
                                     "examples": ours["examples"]}
        print(depth, results[f"resnet{depth}"], flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
