"""Measuring: what a model costs and how fast it runs.

- ``speed``: ``python -m vittm.bench``, ViTTM against ViT side by side (images/s, latency, MACs, memory; classification
  and segmentation forwards), conf/bench.yaml.
- ``cost``: the kernel and byte meter (ATen ops per forward / training step, bytes written outside matmuls).
- ``data``: ``python -m vittm.bench.data``, FFCV against torchvision loaders on the same JPEGs.

Depends on models, tasks and training; nothing below imports it.
"""
