"""The torchvision side of the side-by-side benchmark (needs the `bench` extra).

Runs torchvision's `fcn_resnet50` / `fcn_resnet101` (random weights:
`weights=None, weights_backbone=None`) under the same `Measurement` protocol
as `benchmarks.model`: same input size, batch, thread count and number
of timed calls, one fresh process per measurement (`benchmarks.harness`).

The training step is the reference's: forward in train mode, pixel
cross-entropy (ignore 255) on "out" + aux_weight x on "aux", backward,
`torch.optim.SGD(momentum, weight_decay)` step. Inference is
`torch.no_grad()` on a model built without the aux head (its output would
be dropped). FLOPs come from PyTorch's `FlopCounterMode` (2 x multiply-adds),
the same convention as TensorFlow's profiler for convolutions.

Only run by `scripts/benchmark.py --compare=torchvision` (in child
processes); nothing else in the project needs torch. The module itself
imports neither torch nor TensorFlow, so the planner can import it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.harness import Measurement, current_rss_mb, peak_rss_mb, time_calls

ARCHS = ("fcn_resnet50", "fcn_resnet101")


def torchvision_arch(depth: int) -> str:
    """torchvision's FCN builder name for a ResNet depth (50 or 101)."""
    arch = f"fcn_resnet{depth}"
    if arch not in ARCHS:
        raise ValueError(f"torchvision has FCN only for ResNet-50/101, not ResNet-{depth}")
    return arch


def _optimizer_settings(experiment: str) -> tuple[float, float, float, float, int]:
    import experiments
    from fcn_tf.config import ExperimentConfig

    config = experiments.get(experiment) if experiment else ExperimentConfig(name="benchmark")
    o = config.optimizer
    return o.base_lr, o.momentum, o.weight_decay, config.trainer.aux_weight, config.data.ignore_label


def run_torch(measurement: Measurement) -> dict:
    """Runs one torchvision measurement in this process; returns the result dict."""
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    m = measurement
    torch.set_num_threads(m.threads)
    baseline_mb = current_rss_mb()
    start = time.perf_counter()
    torch.manual_seed(m.seed)
    arch, num_classes = m.model["arch"], int(m.model["num_classes"])
    if arch not in ARCHS:
        raise ValueError(f"unknown torchvision model {arch!r}; choose from {ARCHS}")
    train = m.what == "train"
    net = getattr(torchvision.models.segmentation, arch)(
        weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=train
    )
    h, w = m.size
    images = torch.randn(m.batch, 3, h, w)
    lr, momentum, weight_decay, aux_weight, ignore_label = _optimizer_settings(m.experiment)
    labels = torch.randint(0, num_classes, (m.batch, h, w))
    labels[torch.rand(m.batch, h, w) < 0.05] = ignore_label
    result: dict[str, Any] = {
        "label": m.label,
        "framework": "torch",
        "what": m.what,
        "batch": m.batch,
        "images_per_call": m.batch,
    }

    if train:
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        criterion = torch.nn.CrossEntropyLoss(ignore_index=ignore_label)

        def call():
            optimizer.zero_grad(set_to_none=True)
            outputs = net(images)
            loss = criterion(outputs["out"], labels) + aux_weight * criterion(outputs["aux"], labels)
            loss.backward()
            optimizer.step()
            return loss.item()

        result["step"] = "torch SGD, CE(out) + aux_weight * CE(aux)"
    elif m.what == "infer":
        net.eval()

        def call():
            with torch.no_grad():
                return float(net(images)["out"][0, 0, 0, 0])

    else:
        raise ValueError(f"torch side measures train or infer, not {m.what!r}")
    times = time_calls(call, m.warmup, m.repeats)
    result.update(
        times=times,
        images_per_s=m.batch / statistics.median(times),
        setup_s=time.perf_counter() - start - sum(times),
        peak_rss_mb=peak_rss_mb(baseline_mb),
        baseline_rss_mb=baseline_mb,
        versions={"torch": torch.__version__, "torchvision": torchvision.__version__},
    )
    if m.flops:
        # After the timing and the peak-memory reading, as on the TF side.
        net.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            net(images[:1])
        forward = int(counter.get_total_flops())
        # Same convention as the TF side: a training step is 3x the forward.
        result["flops_per_image"] = 3 * forward if train else forward
        if train:
            result["forward_flops_per_image"] = forward
    return result


def matmul_gflops(threads: int, sizes: Sequence[int] = (2048, 4096, 6144), repeats: int = 3) -> dict:
    """torch's float32 matrix-multiply peak in this process (the torchvision rows' roofline), in GFLOP/s.

    The same sizes and rule as `benchmarks.model.matmul_gflops`: `torch.mm`
    of n x n matrices, the best median over `sizes`.

    Args:
      threads: torch.set_num_threads.
      sizes: matrix sizes tried.
      repeats: timed products per size, after one untimed one.
    """
    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, generator=generator)
        b = torch.randn(n, n, generator=generator)
        times = time_calls(lambda a=a, b=b: float(torch.mm(a, b)[0, 0]), 1, repeats)
        by_size[str(n)] = 2.0 * n**3 / statistics.median(times) / 1e9
    return {"gflops": max(by_size.values()), "by_size": by_size}
