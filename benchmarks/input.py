"""Input-pipeline benchmark: training images/s per core and on all cores.

Writes synthetic VOC-sized JPEGs (500x375) and Cityscapes-sized PNGs
(2048x1024) with grayscale PNG labels into a temporary folder, then runs the
whole training pipeline (`fcn_tf.data.build_dataset`, decode included, as the
reference measures) with the voc / cityscapes experiments' DataConfigs
(crops 512x512 / 512x1024, their scale targets and batch sizes). The
reference reads the files as users have them. Our side reads VOC's JPEGs
directly (the prepared dataset stores the same bytes) and Cityscapes from
the dataset `scripts/prepare_data.py` writes from them (the same files in
the official layout, run through `fcn_tf.data.sources.prepare`: training
images stored as PNG strips, read from the TFDS records). Each
measurement runs in a fresh subprocess pinned to 1 core or to all cores
(`sched_setaffinity`, TensorFlow and tf.data thread pools of that size) and
reports the median images/s over timed repeats after a warm-up.

With OpenCV installed (`pip install opencv-python-headless`), the
reference's OpenCV/numpy pipeline (sssegmentation's transforms: cv2 decode,
keep-ratio resize, crop with `np.unique` retries, flip, photometric
distortion in uint8 HSV, normalize, pad) is timed on the same files side by
side, one process per core as PyTorch DataLoader workers would be; the
ratio measured in one run is robust to the machine's load, the fixed
anchors (the reference's 78 / 11 images/s per core, measured earlier on a
2-core AVX2 EPYC) are not.

The synthetic textures are calibrated to real file sizes (VOC JPEGs ~100 KB,
Cityscapes PNGs ~2.2 MB): decode time follows the encoded size. How the
real Cityscapes PNGs were written is not known; `png_writer` picks the
encoder of the users' files: "libpng" (libpng's defaults, as TensorFlow and
most tools write) or "opencv" (`cv2.imwrite`'s defaults, which decode
faster, favouring the reference; measured, see BENCHMARKS.md).

Library use: `run(...)` returns result rows; `format_table(rows)`.
Command line: `python scripts/benchmark.py --what=input`, or
`python -m benchmarks.input --input_dataset=both` from the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import load_average, run_child


@dataclasses.dataclass(frozen=True)
class Kind:
    """One benchmarked input kind.

    Attributes:
      experiment: registered experiment whose DataConfig is used.
      size: (height, width) of the synthetic images.
      image_format: "jpeg" or "png".
      anchor: the reference's images/s per core measured earlier on a 2-core AVX2 EPYC.
      num_classes: classes drawn in the synthetic labels.
      files: distinct synthetic examples written.
      images: images per timed repeat (default).
      noise: pixel noise std of the synthetic images (calibrates file size).
      prepared: our side reads the dataset prepare_data.py writes from the
        files (Cityscapes layout) instead of the files themselves.
    """

    experiment: str
    size: tuple[int, int]
    image_format: str
    anchor: float
    num_classes: int
    files: int
    images: int
    noise: float
    prepared: bool = False


KINDS = {
    "voc": Kind("voc_r50_os8", (375, 500), "jpeg", 78.0, 21, 32, 192, noise=16.0),
    "cityscapes": Kind("cityscapes_r50_os8", (1024, 2048), "png", 11.0, 19, 8, 32, noise=0.7, prepared=True),
}
PNG_WRITERS = ("libpng", "opencv")


# --------------------------------------------------------- synthetic data ---


def _octave(rng, h, w, cells_h, cells_w, channels):
    # Smooth random field: random values on a coarse grid, bilinear upsampled.
    from PIL import Image

    grid = rng.uniform(0, 1, (cells_h, cells_w, channels)).astype(np.float32)
    planes = [
        np.asarray(Image.fromarray(grid[..., c], mode="F").resize((w, h), Image.BILINEAR))
        for c in range(channels)
    ]
    return np.stack(planes, axis=-1)


def synthetic_example(rng, size, num_classes, noise=2.0):
    """A textured RGB image and a blocky label map with some ignore pixels.

    The image is a sum of smooth random fields at several scales, a few
    sharp-edged shapes and mild pixel noise: roughly the detail of a photo,
    so JPEG/PNG sizes (and decode times) are close to the real datasets'.

    Args:
      rng: numpy Generator.
      size: (height, width).
      num_classes: classes drawn in the label.
      noise: std of the per-pixel noise.

    Returns:
      (image uint8 (h, w, 3), label uint8 (h, w)).
    """
    h, w = size
    image = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 140.0), (16, 50.0), (64, 30.0), (h // 3, 22.0)):
        image += amp * _octave(rng, h, w, max(cells * h // w, 2), cells, 3)
    # Sharp-edged regions, as objects in a photo; labels follow them.
    label = np.zeros((h, w), np.uint8)
    gh, gw = 6, 8
    classes = rng.integers(0, num_classes, (gh, gw))
    ys = np.minimum(np.arange(h) * gh // h, gh - 1)
    xs = np.minimum(np.arange(w) * gw // w, gw - 1)
    label[:] = classes[ys][:, xs]
    for _ in range(12):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = min(h, y0 + rng.integers(h // 20, h // 3)), min(w, x0 + rng.integers(w // 20, w // 3))
        label[y0:y1, x0:x1] = rng.integers(0, num_classes)
        image[y0:y1, x0:x1] += rng.uniform(-60, 60, 3)
    label[:, : w // 50] = 255  # an ignored border, as VOC's object outlines
    image += rng.normal(0.0, noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_synthetic(
    directory, kind: Kind, seed: int = 0, png_writer: str = "libpng"
) -> list[tuple[str, str]]:
    """Writes `kind.files` synthetic examples; returns [(image_path, label_path)].

    JPEG quality 90 (VOC's files are ~100 KB at 500x375). PNG images with
    `png_writer`'s defaults: "libpng" (zlib level 6, adaptive filters; what
    `tf.io.encode_png`, Pillow and most tools write) or "opencv"
    (`cv2.imencode`: level 1, Sub filter, RLE). Labels: libpng PNGs of class ids.
    """
    import tensorflow as tf

    if png_writer not in PNG_WRITERS:
        raise ValueError(f"png_writer must be one of {PNG_WRITERS}, got {png_writer!r}")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = []
    ext = "jpg" if kind.image_format == "jpeg" else "png"
    for i in range(kind.files):
        image, label = synthetic_example(rng, kind.size, kind.num_classes, kind.noise)
        if kind.image_format == "jpeg":
            data = tf.io.encode_jpeg(image, quality=90).numpy()
        elif png_writer == "opencv":
            import cv2

            data = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))[1].tobytes()
        else:
            data = tf.io.encode_png(image).numpy()
        image_path, label_path = directory / f"{i:04d}.{ext}", directory / f"{i:04d}_label.png"
        image_path.write_bytes(data)
        label_path.write_bytes(tf.io.encode_png(label[..., None]).numpy())
        pairs.append((str(image_path), str(label_path)))
    return pairs


def prepare_cityscapes(pairs, directory) -> str:
    """Prepares `pairs` as a Cityscapes dataset, as `scripts/prepare_data.py` would.

    The image files are copied unchanged into the official layout
    (leftImg8bit/train/bench/...), the train-id labels written as
    `_gtFine_labelIds.png` with the official label ids (ignore -> 0,
    "unlabeled"), and the first example is also the one-image val split.

    Args:
      pairs: [(image_path, label_path)] from `write_synthetic`.
      directory: where the raw layout and the TFDS data directory go.

    Returns:
      the TFDS data directory (DataConfig.data_dir).
    """
    import shutil

    import tensorflow as tf
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    from fcn_tf.data import sources
    from fcn_tf.data.classes import cityscapes_label_ids

    # Train id -> label id; ignore (255) -> 0, "unlabeled".
    to_label_id = np.zeros(256, np.uint8)
    to_label_id[:19] = cityscapes_label_ids()
    raw = Path(directory) / "raw"
    for folder, chosen in (("train", pairs), ("val", pairs[:1])):
        for i, (image_path, label_path) in enumerate(chosen):
            base = f"bench_000000_{i:06d}"
            image_dir = raw / "leftImg8bit" / folder / "bench"
            label_dir = raw / "gtFine" / folder / "bench"
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image_path, image_dir / f"{base}_leftImg8bit.png")
            train_ids = tf.io.decode_png(Path(label_path).read_bytes(), channels=1).numpy()
            (label_dir / f"{base}_gtFine_labelIds.png").write_bytes(
                tf.io.encode_png(to_label_id[train_ids]).numpy()
            )
    data_dir = Path(directory) / "tfds"
    tfds.disable_progress_bar()
    # TFDS logs each step of the build at INFO; the benchmark prints its own summary.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        sources.prepare("cityscapes", raw, data_dir, allow_count_mismatch=True)
    finally:
        absl_logging.set_verbosity(verbosity)
    return str(data_dir)


def file_source(pairs):
    """tf.data source of encoded examples (`fcn_tf.data.encoded`) read from `pairs` of paths."""
    import tensorflow as tf

    from fcn_tf.data import encoded

    images, labels = zip(*pairs)
    ds = tf.data.Dataset.from_tensor_slices((list(images), list(labels)))
    return ds.map(lambda image, label: encoded.from_files(tf.io.read_file(image), tf.io.read_file(label)))


# ------------------------------------------------------------ our pipeline ---


def measure_tf(
    pairs, experiment: str, cores: int, images: int, repeats: int, warmup: int, data_dir: str | None = None
) -> list[float]:
    """Images/s of `build_dataset` over `pairs`, one value per timed repeat.

    Call in a fresh process (threads are set before TensorFlow starts).

    Args:
      data_dir: read the prepared dataset there (`prepare_cityscapes`)
        instead of the files of `pairs`.
    """
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(cores)
    tf.config.threading.set_inter_op_parallelism_threads(cores)
    import experiments
    from fcn_tf.data import build_dataset

    data_config = experiments.get(experiment).data
    if data_dir:
        data_config = dataclasses.replace(data_config, data_dir=data_dir)
        ds = build_dataset(data_config, training=True)
    else:
        ds = build_dataset(data_config, training=True, source=file_source(pairs))
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)
    batch = data_config.global_batch_size
    batches = max(1, -(-images // batch))
    it = iter(ds)
    for _ in range(max(1, -(-warmup // batch))):
        next(it)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * batch / (time.perf_counter() - start))
    return rates


# ---------------------------------------------------- reference pipeline ---


class ReferencePipeline:
    """sssegmentation's train transforms in OpenCV/numpy, for timing side by side.

    Resize (keep ratio, `(2048r, 512r)`), RandomCrop (10 tries, 0.75 rule
    with `np.unique`), RandomFlip, PhotoMetricDistortion (uint8 HSV),
    Normalize (float32, BGR -> RGB), Padding; images read with
    `cv2.imread`, labels with `cv2.IMREAD_GRAYSCALE`.
    """

    def __init__(self, data_config, seed=0):
        import cv2

        cv2.setNumThreads(1)
        self.cv2 = cv2
        self.c = data_config
        self.rng = np.random.default_rng(seed)

    def __call__(self, image_path, label_path):
        cv2, c, rng = self.cv2, self.c, self.rng
        image = cv2.imread(image_path, cv2.IMREAD_COLOR)
        label = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)
        # Resize.
        r = rng.uniform(*c.ratio_range)
        target = int(c.scale_target[0] * r), int(c.scale_target[1] * r)
        h, w = image.shape[:2]
        scale = min(max(target) / max(h, w), min(target) / min(h, w))
        dsize = int(w * scale + 0.5), int(h * scale + 0.5)
        image = cv2.resize(image, dsize, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, dsize, interpolation=cv2.INTER_NEAREST)
        # Crop with the single-class rule.
        h, w = label.shape
        ch, cw = min(c.crop_size[0], h), min(c.crop_size[1], w)
        for _ in range(c.crop_tries):
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = label[top : top + ch, left : left + cw]
            values, counts = np.unique(crop, return_counts=True)
            counts = counts[values != c.ignore_label]
            if len(counts) > 1 and counts.max() / counts.sum() < c.cat_max_ratio:
                break
        image, label = image[top : top + ch, left : left + cw], crop
        # Flip.
        if rng.uniform() < c.flip_prob:
            image, label = np.flip(image, axis=1), np.flip(label, axis=1)
        # Photometric distortion.
        image = self._photometric(np.ascontiguousarray(image))
        # Normalize (BGR -> RGB) and pad.
        image = image.astype(np.float32)
        cv2.cvtColor(image, cv2.COLOR_BGR2RGB, image)
        image = (image - np.float32(c.mean)) * np.float32(1.0 / np.float64(c.std))
        pad_h, pad_w = c.crop_size[0] - image.shape[0], c.crop_size[1] - image.shape[1]
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        label = cv2.copyMakeBorder(
            np.ascontiguousarray(label), 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=c.ignore_label
        )
        return image, label

    def _convert(self, image, alpha=1.0, beta=0.0):
        return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _photometric(self, image):
        cv2, rng = self.cv2, self.rng
        if rng.integers(2):
            image = self._convert(image, beta=rng.uniform(-32, 32))
        mode = rng.integers(2)
        if mode == 1 and rng.integers(2):
            image = self._convert(image, alpha=rng.uniform(0.5, 1.5))
        if rng.integers(2):
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            hsv[..., 1] = self._convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if rng.integers(2):
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(int) + rng.integers(-18, 18)) % 180
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if mode == 0 and rng.integers(2):
            image = self._convert(image, alpha=rng.uniform(0.5, 1.5))
        return image


def _reference_worker(args):
    pairs, experiment, count, seed = args
    import experiments

    os.sched_setaffinity(0, {seed % os.cpu_count()})
    pipeline = ReferencePipeline(experiments.get(experiment).data, seed=seed)
    for i in range(count):
        pipeline(*pairs[i % len(pairs)])


def measure_reference(
    pairs, experiment: str, cores: int, images: int, repeats: int, warmup: int
) -> list[float]:
    """Images/s of the OpenCV reference, `cores` worker processes (one per core)."""
    import multiprocessing

    import experiments

    if cores == 1:
        pipeline = ReferencePipeline(experiments.get(experiment).data)
        for i in range(warmup):
            pipeline(*pairs[i % len(pairs)])
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(images):
                pipeline(*pairs[i % len(pairs)])
            rates.append(images / (time.perf_counter() - start))
        return rates
    per_worker = -(-images // cores)
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.map(_reference_worker, [(pairs, experiment, max(1, warmup // cores), i) for i in range(cores)])
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            pool.map(_reference_worker, [(pairs, experiment, per_worker, i) for i in range(cores)])
            rates.append(per_worker * cores / (time.perf_counter() - start))
    return rates


# ----------------------------------------------------------- orchestration ---


def reference_available() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def measure_child(
    pipeline: str,
    pairs_file: str,
    experiment: str,
    cores: int,
    images: int,
    repeats: int,
    warmup: int,
    data_dir: str,
) -> list[float]:
    """One measurement in a child process pinned to `cores` cores: images/s per timed repeat."""
    os.sched_setaffinity(0, set(range(cores)))
    pairs = json.loads(Path(pairs_file).read_text())
    if pipeline == "tf":
        return measure_tf(pairs, experiment, cores, images, repeats, warmup, data_dir)
    return measure_reference(pairs, experiment, cores, images, repeats, warmup)


def measure_in_subprocess(
    pipeline, pairs_file, kind: Kind, cores, images, repeats, warmup, data_dir=""
) -> list[float]:
    """Runs one measurement in a fresh Python pinned to `cores` cores."""
    # OpenMP/BLAS pools of numpy and OpenCV follow the core count too.
    env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), "CUDA_VISIBLE_DEVICES": ""}
    env["OMP_NUM_THREADS"] = str(cores)
    kwargs = dict(
        pipeline=pipeline,
        pairs_file=str(pairs_file),
        experiment=kind.experiment,
        cores=cores,
        images=images,
        repeats=repeats,
        warmup=warmup,
        data_dir=data_dir,
    )
    try:
        return run_child("benchmarks.input:measure_child", {"kwargs": kwargs}, env)
    except RuntimeError as error:
        raise RuntimeError(
            f"input benchmark subprocess failed ({pipeline}, {cores} cores): {error}"
        ) from error


def run(
    kinds=("voc", "cityscapes"),
    images: int | None = None,
    repeats: int = 5,
    warmup: int | None = None,
    cores=None,
    reference: bool | None = None,
    png_writer: str = "libpng",
    log=print,
) -> list[dict]:
    """Measures every kind on 1 core and on all cores; returns one row each.

    Args:
      kinds: keys of `KINDS`.
      images: images per timed repeat (default: the kind's).
      repeats: timed repeats; the median is reported.
      warmup: images before timing (default: one repeat's worth).
      cores: core counts to measure (default: 1 and all available).
      reference: also time the OpenCV reference (default: if cv2 imports).
      png_writer: encoder of the synthetic PNG files (`write_synthetic`).
      log: progress printer.

    Returns:
      dicts with kind, pipeline, cores, images_per_s (median), per_core,
      runs (all repeats), anchor, and for ours the ratio to the reference
      measured side by side and to the anchor.
    """
    cores = cores or sorted({1, len(os.sched_getaffinity(0))})
    if reference is None:
        reference = reference_available()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fcn_tf_input_bench_") as tmp:
        for name in kinds:
            kind = KINDS[name]
            n = images or kind.images
            w = n if warmup is None else warmup
            pairs = write_synthetic(Path(tmp) / name, kind, png_writer=png_writer)
            pairs_file = Path(tmp) / f"{name}.json"
            pairs_file.write_text(json.dumps(pairs))
            sizes = [os.path.getsize(p) for p, _ in pairs]
            writer = f" ({png_writer})" if kind.image_format == "png" else ""
            log(
                f"{name}: {len(pairs)} synthetic {kind.size[1]}x{kind.size[0]} {kind.image_format.upper()}s"
                f"{writer}, mean {np.mean(sizes) / 1e3:.0f} KB; {n} images x {repeats} repeats after {w} warm-up"
            )
            data_dir = ""
            if kind.prepared:
                start = time.perf_counter()
                data_dir = prepare_cityscapes(pairs, Path(tmp) / f"{name}_prepared")
                stored = _train_image_bytes(data_dir)
                log(
                    f"  prepared as prepare_data.py does in {time.perf_counter() - start:.1f} s; stored training "
                    f"images: mean {stored / len(pairs) / 1e3:.0f} KB ({stored / sum(sizes) - 1:+.1%} vs the files)"
                )
            pipelines = ["tf"] + (["reference"] if reference else [])
            for c in cores:
                for p in pipelines:
                    rates = measure_in_subprocess(p, pairs_file, kind, c, n, repeats, w, data_dir)
                    med = statistics.median(rates)
                    row = dict(
                        kind=name,
                        pipeline="fcn_tf (tf.data)" if p == "tf" else "reference (OpenCV)",
                        cores=c,
                        images_per_s=med,
                        per_core=med / c,
                        runs=rates,
                        anchor=kind.anchor,
                        load=load_average(),
                    )
                    rows.append(row)
                    log(
                        f"  {row['pipeline']:<20} {c} core(s): {med:7.1f} images/s "
                        f"(repeats {', '.join(f'{r:.1f}' for r in rates)}; load {row['load']:.2f})"
                    )
    for row in rows:
        ref = [r for r in rows if r["kind"] == row["kind"] and r["cores"] == row["cores"] and r is not row]
        if row["pipeline"].startswith("fcn_tf"):
            row["vs_reference"] = row["images_per_s"] / ref[0]["images_per_s"] if ref else None
            row["vs_anchor"] = row["per_core"] / row["anchor"]
    return rows


def _train_image_bytes(data_dir) -> int:
    """Bytes of the stored training image strips of a prepared Cityscapes dataset."""
    import tensorflow as tf

    from fcn_tf.config import DataConfig
    from fcn_tf.data import sources

    config = DataConfig(dataset="cityscapes", data_dir=data_dir)
    ds = sources.encoded_split(config, "train")
    return sum(int(tf.reduce_sum(tf.strings.length(e["image_strips"]))) for e in ds)


def format_table(rows) -> str:
    """A Markdown table of `run`'s rows."""
    lines = [
        "| input | pipeline | cores | images/s (median) | per core | vs reference, same run | per core vs anchor |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        vs_ref = f"{r['vs_reference']:.2f}x" if r.get("vs_reference") else ""
        vs_anchor = f"{r['vs_anchor']:.2f}x (anchor {r['anchor']:g})" if "vs_anchor" in r else ""
        label = "VOC 500x375 JPEG" if r["kind"] == "voc" else "Cityscapes 2048x1024 PNG"
        lines.append(
            f"| {label} | {r['pipeline']} | {r['cores']} | {r['images_per_s']:.1f} | {r['per_core']:.1f} "
            f"| {vs_ref} | {vs_anchor} |"
        )
    return "\n".join(lines)


def main(
    config=None,
    input_dataset: str | None = None,
    images: int | None = None,
    repeats: int | None = None,
    png_writer: str = "libpng",
):
    """`scripts/benchmark.py --what=input`: measures and prints the table.

    Args:
      config: an ExperimentConfig or None; without `input_dataset`, its
        dataset picks the kind (cityscapes -> PNG, otherwise VOC-sized JPEG;
        no config: both).
      input_dataset: "voc", "cityscapes" or "both".
      images: images per timed repeat.
      repeats: timed repeats.
      png_writer: encoder of the synthetic PNG files (`write_synthetic`).

    Returns:
      the result rows.
    """
    if input_dataset in (None, "") and config is not None:
        kinds = ["cityscapes"] if config.data.dataset == "cityscapes" else ["voc"]
    elif input_dataset in (None, ""):
        kinds = ["voc", "cityscapes"]
    elif input_dataset == "both":
        kinds = ["voc", "cityscapes"]
    else:
        kinds = [input_dataset]
    rows = run(
        kinds, images=images, repeats=repeats or 5, png_writer=png_writer, log=lambda s: print(s, flush=True)
    )
    print()
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input_dataset", default="both", choices=["voc", "cityscapes", "both"])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--png_writer", default="libpng", choices=PNG_WRITERS)
    a = parser.parse_args()
    main(input_dataset=a.input_dataset, images=a.images, repeats=a.repeats, png_writer=a.png_writer)
