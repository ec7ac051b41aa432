"""Semantic segmentation (the ViTTM paper's ADE20K setting): a classification backbone's last-layer features, a
Segmenter or linear decoder, mmseg-style slide/whole inference and mmseg's IoU metrics.

- ``network``: ``SegmentationNet`` (backbone + decoder + upsampling), for ViTTM and timm ViT/DeiT baselines alike.
- ``decoders``: ``segmenter`` (mask transformer) and ``linear``, by name (``DECODERS``).
- ``inference``: ``slide_inference``, ``whole_inference``, ``predict``, ``predict_labels``.
- ``metrics``: ``SegmentationMetrics`` (mIoU, mAcc, pixel accuracy, per-class IoU; DDP-synced).
"""

from __future__ import annotations

from vittm.tasks.segmentation.decoders import DECODERS, LinearDecoder, SegmenterDecoder, build_decoder
from vittm.tasks.segmentation.inference import predict, predict_labels, slide_inference, whole_inference
from vittm.tasks.segmentation.metrics import SegmentationMetrics
from vittm.tasks.segmentation.network import FEATURES, ProcessOnlyLayer, SegmentationNet

__all__ = [
    "DECODERS", "FEATURES", "LinearDecoder", "ProcessOnlyLayer", "SegmentationMetrics", "SegmentationNet",
    "SegmenterDecoder", "build_decoder", "predict", "predict_labels", "slide_inference", "whole_inference",
]
