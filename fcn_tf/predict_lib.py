"""Segment image files and write pictures of the result.

A `Predictor` runs the export's `serving_default` function, either loaded
from a SavedModel (`Predictor.load`) or built in-process from a checkpoint
(`Predictor.from_checkpoint`, the same `SegmentationServer` graph that
`fcn_tf.export.saved_model.export` saves), so both paths go through the
same decoding, checks, resizing and normalization a TF Serving client gets.
`Predictor.load` also takes a fixed-size LiteRT (.tflite) or ONNX (.onnx)
export (`fcn_tf.export.fixed_size`), run in its own runtime: images are
decoded and checked as the SavedModel does, resized to the model's size and
the logits back to the image's (`fcn_tf.export.logits_at_image_size`).

`predict_files` writes, per input `NAME.ext`:
- `NAME_labels.png`: the label map coloured with the class palette;
- `NAME_overlay.png`: those colours blended over the image (alpha 0.5).
A file that cannot be read or segmented is reported with the reason and
the others are still processed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from fcn_tf import export, visualize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
FIXED_SIZE_EXTENSIONS = (".tflite", ".onnx")


@dataclasses.dataclass
class Predictor:
    """Segments encoded images.

    Attributes:
      serve: maps a string tensor (N,) of encoded images to the
        `serving_default` outputs (`labels`, `confidence`, `heights`, `widths`).
      class_names: one name per class.
      palette: uint8 (num_classes, 3).
      owner: the object holding the variables `serve` reads (kept alive).
    """

    serve: Callable
    class_names: list[str]
    palette: np.ndarray
    owner: object = None

    @classmethod
    def load(cls, export_dir: str, max_pixels: int = export.DEFAULT_MAX_PIXELS) -> Predictor:
        """From an export: a version directory, `BASE/NAME` (its latest version), or a .tflite / .onnx file.

        Args:
          export_dir: the export.
          max_pixels: largest height * width accepted (fixed-size files; a
            SavedModel has its own).
        """
        if os.path.splitext(export_dir)[1].lower() in FIXED_SIZE_EXTENSIONS:
            return cls._load_fixed(export_dir, max_pixels)
        saved_model_dir = export.resolve_version_dir(export_dir)
        loaded = tf.saved_model.load(saved_model_dir)
        signature = loaded.signatures[export.SERVING_DEFAULT]
        names, palette = export.read_class_info(saved_model_dir)
        return cls(lambda images: signature(images=images), names, palette, owner=loaded)

    @classmethod
    def _load_fixed(cls, path: str, max_pixels: int) -> Predictor:
        if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
            raise FileNotFoundError(f"no export file {path}")
        runner = export.load_runner(path)
        names, palette = export.read_class_info(os.path.dirname(path) or ".")

        def serve(images):
            outputs = {"labels": [], "confidence": [], "heights": [], "widths": []}
            for index, contents in enumerate(images):
                image = export.decode(contents, tf.constant(index), max_pixels)
                probabilities = tf.nn.softmax(export.logits_at_image_size(runner, image), axis=-1)
                outputs["labels"].append(tf.argmax(probabilities, -1, output_type=tf.int32))
                outputs["confidence"].append(tf.reduce_max(probabilities, -1))
                outputs["heights"].append(tf.shape(image)[0])
                outputs["widths"].append(tf.shape(image)[1])
            pad = {"labels": export.LABEL_PAD, "confidence": 0.0}
            return {
                key: tf.ragged.stack(value).to_tensor(default_value=pad[key])
                if key in pad
                else tf.stack(value)
                for key, value in outputs.items()
            }

        return cls(serve, names, palette, owner=runner)

    @classmethod
    def from_checkpoint(cls, config, checkpoint: str, max_pixels: int = export.DEFAULT_MAX_PIXELS):
        """Builds the model of `config`, restores `checkpoint` and serves it in-process.

        Args:
          config: the experiment.
          checkpoint: workdir, checkpoint prefix or `.weights.h5` (see
            `fcn_tf.checkpoints.resolve`).
          max_pixels: largest height * width accepted.
        """
        model, _ = export.restored_model(config, checkpoint)
        server = export.SegmentationServer(config, model, max_pixels=max_pixels)
        names, palette = export.class_info(config)
        return cls(server.serve, names, palette, owner=server)

    def segment(self, contents: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Segments one encoded image.

        Args:
          contents: the file's bytes (JPEG, PNG, GIF, BMP or WebP).

        Returns:
          (labels int32 (H, W), confidence float32 (H, W)) at the image's size.

        Raises:
          tf.errors.InvalidArgumentError: the bytes are not an acceptable image.
        """
        out = self.serve(tf.constant([contents]))
        h, w = int(out["heights"][0]), int(out["widths"][0])
        return out["labels"][0, :h, :w].numpy(), out["confidence"][0, :h, :w].numpy()


def error_reason(error: Exception) -> str:
    """A one-line reason from a TensorFlow error (the assertion text when there is one).

    Args:
      error: what segmenting a file raised.
    """
    message = getattr(error, "message", None) or str(error)
    found = re.search(r"assertion failed: \[(.*)\]", message)
    if found:
        return found.group(1).replace('\\"', '"')
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[")
    for line in message.splitlines():
        line = re.sub(r"\{\{function_node [^}]*\}\}", "", line).strip()
        if line and not line.startswith(noise):
            return re.sub(r"\s*\[Op:[^\]]*\]$", "", line)
    return type(error).__name__


def list_images(path: str) -> list[str]:
    """The image files to process: `path` itself, or the image files in a directory (sorted).

    Args:
      path: an image file or a directory.

    Raises:
      FileNotFoundError: `path` does not exist.
    """
    # Through TensorFlow's filesystem layer: `path` may be a URL (gs://, file://, ...).
    if tf.io.gfile.isdir(path):
        names = sorted(n for n in tf.io.gfile.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        return [os.path.join(path, n) for n in names if not tf.io.gfile.isdir(os.path.join(path, n))]
    if tf.io.gfile.exists(path):
        return [path]
    raise FileNotFoundError(f"input not found: {path}")


def _output_stems(paths: Sequence[str]) -> list[str]:
    # "a.jpg" and "a.png" would both write a_labels.png: keep the extension then.
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return [
        stem if stems.count(stem) == 1 else os.path.basename(p).replace(".", "_")
        for stem, p in zip(stems, paths)
    ]


@dataclasses.dataclass
class FileResult:
    """Outcome for one input file: written outputs, or the reason it failed."""

    path: str
    outputs: list[str]
    error: str | None = None
    size: tuple[int, int] | None = None


def predict_files(
    predictor: Predictor, paths: Sequence[str], output_dir: str, alpha: float = 0.5, log=print
) -> list[FileResult]:
    """Segments each file and writes its pictures into `output_dir`.

    Args:
      predictor: the model.
      paths: image files.
      output_dir: created if missing.
      alpha: weight of the label colours in the overlay.
      log: called with one line per file.

    Returns:
      One `FileResult` per path, in order.
    """
    tf.io.gfile.makedirs(output_dir)
    results = []
    for path, stem in zip(paths, _output_stems(paths)):
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                contents = f.read()
            labels, _ = predictor.segment(contents)
            # Decoded as the serving graph decodes it (RGB, first frame).
            image = tf.io.decode_image(contents, channels=3, expand_animations=False).numpy()
            outputs = [
                os.path.join(output_dir, f"{stem}_labels.png"),
                os.path.join(output_dir, f"{stem}_overlay.png"),
            ]
            pictures = [
                visualize.colorize(labels, predictor.palette),
                visualize.overlay(image, labels, predictor.palette, alpha=alpha),
            ]
            for out_path, picture in zip(outputs, pictures):
                tf.io.write_file(out_path, tf.io.encode_png(picture))
        except (OSError, tf.errors.OpError) as e:
            reason = error_reason(e).replace("images[0]", "the file")
            results.append(FileResult(path, [], error=reason))
            log(f"FAILED {path}: {reason}")
            continue
        present = np.unique(labels)
        names = ", ".join(predictor.class_names[i] for i in present)
        results.append(FileResult(path, outputs, size=labels.shape))
        log(f"ok {path} ({labels.shape[0]}x{labels.shape[1]}): {names} -> {', '.join(outputs)}")
    return results


def summary(results: Sequence[FileResult]) -> str:
    """One line: how many files were segmented and how many failed.

    Args:
      results: from `predict_files`.
    """
    failed = [r for r in results if r.error is not None]
    line = f"{len(results) - len(failed)} of {len(results)} images segmented, {len(failed)} failed"
    if failed:
        line += ": " + ", ".join(os.path.basename(r.path) for r in failed)
    return line
