"""Benchmarks: input pipeline (input.py), model throughput, FLOPs and memory (model.py), torchvision side (torch_compare.py)."""
