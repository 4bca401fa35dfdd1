"""The project's benchmarks, kept outside the installed package.

`scripts/benchmark.py` is the entry point (it puts the repository root on
sys.path). `harness` holds what every benchmark shares (the measurement
record, the child-process protocol, the memory and load readings); `model`
is the TensorFlow side, `torch_side` torchvision's, `input` the input
pipeline against the OpenCV reference, `suite` the plans and tables.
"""
