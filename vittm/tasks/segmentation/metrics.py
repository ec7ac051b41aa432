"""Semantic segmentation metrics exactly as mmsegmentation's ``IoUMetric`` (``intersect_and_union`` +
``total_area_to_metrics``), accumulated as one (K, K) confusion matrix, a torchmetrics state summed over DDP ranks.

Over the whole evaluation set, per class c (pixels whose target is ``ignore_index`` are left out first):
    intersect_c = pixels predicted c with target c,  union_c = predicted c + target c - intersect_c
    IoU_c = intersect_c / union_c     (NaN when c is neither predicted nor in the targets: 0/0)
    Acc_c = intersect_c / target_c    (NaN when c is not in the targets, even if predicted)
    mIoU = nanmean(IoU), mAcc = nanmean(Acc), pixel accuracy (mmseg's aAcc) = sum(intersect) / sum(target).
So a class that is predicted but absent from every target has IoU 0 and counts in the mIoU, as in mmseg. Counts are
int64 (mmseg's histc sums are float32, exact up to 2^24 pixels per class); values are fractions, not percentages.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from vittm.core.errors import ConfigError


class SegmentationMetrics(Metric):
    """``update(preds, target)`` with preds = labels (N, H, W) or scores/logits (N, K, H, W) (argmax over K) and
    target (N, H, W) labels in [0, K) or ``ignore_index``; ``compute()`` -> {"miou", "pixel_acc", "macc": float,
    "iou", "acc": (K,) tensors with NaN for classes absent as described above}."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes={num_classes!r}: must be a positive integer")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        # confmat[t, p]: pixels of target class t predicted as p
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        K = self.num_classes
        if preds.dim() == target.dim() + 1:  # scores (N, K, H, W) -> labels (N, H, W)
            if preds.shape[1] != K:
                raise ValueError(f"preds have {preds.shape[1]} classes, the metric {K}")
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        target, preds = target.long().flatten(), preds.long().flatten()
        keep = target != self.ignore_index
        target, preds = target[keep], preds[keep]
        if target.numel() and (target.min() < 0 or target.max() >= K or preds.min() < 0 or preds.max() >= K):
            raise ValueError(f"labels must be in [0, {K}) or ignore_index={self.ignore_index}; got targets in "
                             f"[{target.min()}, {target.max()}], predictions in [{preds.min()}, {preds.max()}]")
        self.confmat += torch.bincount(target * K + preds, minlength=K * K).view(K, K)

    def compute(self) -> dict[str, torch.Tensor | float]:
        confmat = self.confmat.double()
        intersect = confmat.diag()
        area_target, area_pred = confmat.sum(dim=1), confmat.sum(dim=0)
        union = area_pred + area_target - intersect
        iou = intersect / union  # 0/0 -> NaN, as mmseg
        acc = intersect / area_target
        return {
            "miou": float(iou.nanmean()),
            "macc": float(acc.nanmean()),
            "pixel_acc": float(intersect.sum() / area_target.sum()),
            "iou": iou.float(),
            "acc": acc.float(),
        }
