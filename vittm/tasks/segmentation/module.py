"""Segmentation's LightningModule: per-pixel cross-entropy on the training crops, mIoU / pixel accuracy / per-class
IoU on whole images (sliding window or one forward, as ``data.pipeline.test`` says), live and EMA.

Every constructor argument is a plain dict or scalar, saved with ``save_hyperparameters()``, so
``SegmentationModule.load_from_checkpoint(path)`` needs nothing else. The shared machinery (EMA, optimizer,
schedule, numerics, compile) is vittm.training.module's.

Metric names: ``train/loss``, ``val/miou``, ``val/pixel_acc``, ``val/macc``, ``val_ema/miou``,
``test/miou``, ...; the last per-class IoU of each split is kept in ``per_class_iou`` (written as a CSV by the task).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vittm.data.seg_transforms import IGNORE_INDEX as IGNORE
from vittm.tasks.segmentation.inference import predict_labels
from vittm.tasks.segmentation.metrics import SegmentationMetrics
from vittm.tasks.segmentation.network import SegmentationNet
from vittm.training.module import TrainingModule

# IGNORE: the label no loss or metric counts (ADE20K's "other" after reduce_zero_label, crop padding)


class SegmentationModule(TrainingModule):
    def __init__(
        self,
        model: dict[str, Any],
        decoder: dict[str, Any],
        num_classes: int,
        optimizer: dict[str, Any],
        schedule: dict[str, Any],
        loss: dict[str, Any] | None = None,
        test: dict[str, Any] | None = None,
        ema: dict[str, Any] | None = None,
        freeze: str = "none",
        compile: bool | str = False,
        log_grad_norm: bool = False,
        nonfinite: str = "stop",
        class_names: list[str] | None = None,
        img_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = num_classes
        # built at the training crop (img_size), as the authors do: a 224-px classifier's position tables are
        # resampled to the crop's grid once, when its weights are loaded
        self.net = SegmentationNet(model=model, decoder=decoder, num_classes=num_classes, img_size=img_size)
        self.init_training()
        smoothing = (loss or {}).get("label_smoothing", 0.0)
        self.criterion = nn.CrossEntropyLoss(ignore_index=IGNORE, label_smoothing=smoothing)
        self.inference = {"mode": "whole", "crop": None, "stride": None, **(test or {})}
        prefixes = ("val", "val_ema", "test", "test_ema") if self.ema is not None else ("val", "test")
        self.scores = nn.ModuleDict({p: SegmentationMetrics(num_classes, ignore_index=IGNORE) for p in prefixes})
        self.per_class_iou: dict[str, list[float]] = {}  # prefix -> IoU per class of that split's last evaluation

    def _logits(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(x)  # (B, K, H, W): the decoder's masks upsampled to the input

    def load_pretrained(self, path: str) -> str:
        """Fine-tuning start: the backbone from a classification weight file (ours, the authors', a timm ViT's;
        its classifier heads dropped); the decoder stays fresh and the EMA restarts from the loaded weights."""
        report = self.net.load_backbone(path, key="finetune.from_ckpt")
        self.ema = self._new_ema()
        return report

    # ----------------------------------------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every sample of this batch was unreadable or bad (vittm.data.segmentation)
            return None
        images, masks = batch  # (B, 3, crop, crop), (B, crop, crop) with 255 = ignore
        logits = self._call(self.__dict__["_run"], images)
        loss = self.criterion(logits, masks)
        if not self.training_loss(loss, batch_idx):
            return None
        return loss

    # --------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._score(batch, "test")

    def _score(self, batch: Any, stage: str) -> None:
        """Each image predicted as ``self.inference`` says (slide/whole), its class scores resized to its mask's size
        (mmseg's order: softmax, resize, argmax); images of one size (e.g. the scenes) go through as one batch."""
        if batch is None:  # every sample of this batch was bad (vittm.data.segmentation, on_bad_mask=skip)
            return
        images, masks = batch  # lists: (3, h_i, w_i) and (H_i, W_i); each mask at its annotation's resolution
        same = len({tuple(i.shape) for i in images}) == 1 and len({tuple(m.shape) for m in masks}) == 1
        groups = [(torch.stack(images), torch.stack(masks))] if same else \
            [(i.unsqueeze(0), m.unsqueeze(0)) for i, m in zip(images, masks, strict=True)]
        for prefix, ema in [(stage, False)] + ([(f"{stage}_ema", True)] if self.ema is not None else []):
            runner = self.__dict__["_run_ema" if ema else "_run"]
            for x, target in groups:  # (B, 3, h, w), (B, H, W)
                labels = predict_labels(lambda v, r=runner: self._call(r, v), x, out_size=tuple(target.shape[-2:]),
                                        mode=self.inference["mode"], crop=self.inference["crop"],
                                        stride=self.inference["stride"], multiple=self.net.size_multiple)
                self.scores[prefix].update(labels, target)

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def _log_scores(self, stage: str) -> None:
        """mIoU, pixel accuracy and mean class accuracy (computed over all ranks' pixels by torchmetrics), logged as
        scalars; the per-class IoU kept for the CSV."""
        for prefix in (stage, f"{stage}_ema"):
            if prefix not in self.scores:
                continue
            metric = self.scores[prefix]
            if not metric.update_called:
                continue
            scores = metric.compute()
            metric.reset()
            if self.trainer.sanity_checking:
                continue
            for name in ("miou", "pixel_acc", "macc"):
                self.log(f"{prefix}/{name}", float(scores[name]), prog_bar=prefix == stage and name == "miou",
                         sync_dist=False)  # already reduced over ranks
            self.per_class_iou[prefix] = [float(v) for v in scores["iou"]]
