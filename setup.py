"""fcn_tf: FCN semantic segmentation on dilated ResNets in TensorFlow / Keras 3."""

from setuptools import find_packages, setup

setup(
    name="fcn_tf",
    version="0.1.0",
    description="FCN semantic segmentation (dilated ResNet-50/101) in TensorFlow / Keras 3, "
    "numerically identical to sssegmentation's reference",
    python_requires=">=3.10",
    packages=find_packages(include=["fcn_tf", "fcn_tf.*", "experiments", "experiments.*"]),
    install_requires=[
        "tensorflow==2.21.*",
        "keras==3.15.*",
        "tensorflow-datasets",
        "absl-py",
        # tf.summary writes event files only with tensorboard installed (TF 2.21 no longer pulls it in).
        "tensorboard",
        "numpy",
        # scipy reads SBD's MATLAB .mat label files (VOC trainaug preparation).
        "scipy",
        # The export writes TF Serving warm-up records (PredictionLog protos) and
        # the README's gRPC client uses its stubs; it needs nothing TensorFlow
        # does not already pull in (grpcio, protobuf).
        "tensorflow-serving-api==2.21.*",
    ],
    extras_require={
        # GPU machines: TensorFlow with its CUDA and cuDNN libraries (Linux x86_64). Plain
        # `tensorflow` finds no CUDA and trains on the CPU; scripts/train.py refuses that
        # where nvidia-smi lists GPUs (--allow_cpu to proceed).
        "gpu": ["tensorflow[and-cuda]==2.21.*"],
        # Reading PyTorch .pth checkpoints in the converter.
        "torch": ["torch"],
        # Reading .safetensors checkpoints in the converter.
        "safetensors": ["safetensors"],
        # Kept so that `pip install -e .[serving]` still works: the package is a core dependency now.
        "serving": [],
        # LiteRT (.tflite) export: TensorFlow's converter writes it, LiteRT's interpreter checks it.
        "litert": ["ai-edge-litert==2.3.0"],
        # ONNX export: tf2onnx converts, onnxruntime checks.
        "onnx": ["tf2onnx==1.17.0", "onnx==1.23.2", "onnxruntime==1.32.0"],
        # Side-by-side benchmarks against torchvision's FCN.
        # Pinned to the releases that install here without a download (pip's local
        # files): an unpinned torch resolves to a multi-GB CUDA build.
        "bench": [
            "torch==2.14.1; platform_machine == 'x86_64'",
            "torchvision==0.29.1; platform_machine == 'x86_64'",
            "torch==2.9.1; platform_machine == 'aarch64'",
            "torchvision==0.24.1; platform_machine == 'aarch64'",
            "psutil",
        ],
        "test": [
            "pytest",
            "safetensors",
            # The version .pre-commit-config.yaml pins: CI and the hook must agree on the rules.
            "ruff==0.17.6",
            "psutil",
            "ai-edge-litert==2.3.0",
            "tf2onnx==1.17.0",
            "onnx==1.23.2",
            "onnxruntime==1.32.0",
        ],
    },
)
