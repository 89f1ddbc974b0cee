"""The eager per-call overhead of the ops: one tiny ResNet20 training step (batch 2, 8x8 images,
switches 1x1.0, 2x0.5, 4x0.25), where Python, dispatch and autograd glue dominate the arithmetic.

    python bench/overhead.py [--steps N]

Prints the median and minimum step time; compare two trees by running it in each, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from paradis_fast.models import resnet20
from paradis_fast.train import InplaceDistillationLoss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = resnet20(num_classes=10, switches=["1x1.0", "2x0.5", "4x0.25"])
    criterion = InplaceDistillationLoss(teacher=0)
    x, target = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))

    def step():
        model.zero_grad(set_to_none=True)
        criterion(model(x), target).backward()

    for _ in range(20):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(f"tiny ResNet20 step: median {statistics.median(times) * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
