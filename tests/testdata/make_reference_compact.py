"""Regenerates tests/testdata/reference_fcn_*.npz from ../shared/reference/sssegmentation_fcn.

The shared reference holds full feature maps (several MB per model). The
repository keeps what the parity test checks, small enough to ship: the
input, the main and auxiliary logits in full, the upsampled logits on a
strided grid, and 4096 fixed random elements of layer3 and layer4. Run only
when the reference changes:

    python tests/testdata/make_reference_compact.py [--reference_dir=DIR]
"""

import argparse
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("r50_os8", "r50_os16", "r101_os8", "r101_os16")
# Rows/cols of the upsampled logits kept (offsets chosen so every kept pixel
# interpolates between source pixels with a different fractional weight).
UPSAMPLE_GRID = (slice(3, None, 8), slice(5, None, 8))
NUM_SAMPLES = 4096


def compact(outputs):
    rng = np.random.default_rng(0)
    kept = {
        "logits": outputs["logits"],
        "aux_logits": outputs["aux_logits"],
        "upsampled_logits_grid": outputs["upsampled_logits"][:, :, UPSAMPLE_GRID[0], UPSAMPLE_GRID[1]],
    }
    for name in ("layer3", "layer4"):
        flat = outputs[name].reshape(-1)
        index = np.sort(rng.choice(flat.size, NUM_SAMPLES, replace=False))
        kept[f"{name}_index"] = index.astype(np.int64)
        kept[f"{name}_values"] = flat[index]
        kept[f"{name}_absmax"] = np.float32(np.abs(flat).max())
        kept[f"{name}_shape"] = np.array(outputs[name].shape, np.int64)
    return kept


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--reference_dir", default=os.path.join(HERE, "../../../shared/reference/sssegmentation_fcn")
    )
    args = parser.parse_args()
    np.save(
        os.path.join(HERE, "reference_input_nchw.npy"),
        np.load(os.path.join(args.reference_dir, "input_nchw.npy")),
    )
    for model in MODELS:
        with np.load(os.path.join(args.reference_dir, f"fcn_{model}_outputs.npz")) as outputs:
            kept = compact({k: outputs[k] for k in outputs.files})
        path = os.path.join(HERE, f"reference_fcn_{model}.npz")
        np.savez(path, **kept)
        print(path, os.path.getsize(path))
    for model in MODELS:
        src = os.path.join(args.reference_dir, f"fcn_{model}_keys.tsv")
        with open(src) as f, open(os.path.join(HERE, f"reference_fcn_{model}_keys.tsv"), "w") as g:
            g.write(f.read())


if __name__ == "__main__":
    main()
