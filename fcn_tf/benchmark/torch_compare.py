"""The torchvision side of the side-by-side benchmark (needs the `bench` extra).

Runs torchvision's `fcn_resnet50` / `fcn_resnet101` (random weights:
`weights=None, weights_backbone=None`) under the same `Measurement` protocol
as `fcn_tf.benchmark.model`: same input size, batch, thread count and number
of timed calls, one fresh process per measurement, one `RESULT {...}` line.

The training step is the reference's: forward in train mode, pixel
cross-entropy (ignore 255) on "out" + aux_weight x on "aux", backward,
`torch.optim.SGD(momentum, weight_decay)` step. Inference is
`torch.no_grad()` on a model built without the aux head (its output would
be dropped). FLOPs come from PyTorch's `FlopCounterMode` (2 x multiply-adds),
the same convention as TensorFlow's profiler for convolutions.

Only imported by `scripts/benchmark.py --compare=torchvision` (through a
child process); nothing else in the project needs torch.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from fcn_tf.benchmark.model import Measurement, child_main, current_rss_mb, peak_rss_mb, time_calls

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
    result: dict[str, Any] = {"label": m.label, "framework": "torch", "what": m.what, "batch": m.batch}

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
        peak_rss_mb=peak_rss_mb(),
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


if __name__ == "__main__":
    child_main(sys.argv, run_torch)
