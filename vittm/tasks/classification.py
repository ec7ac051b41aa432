"""Classification: both heads' losses summed (SPEC §3), mixup/cutmix, top-1/top-5 of every head, live and EMA.

Every constructor argument is a plain dict or scalar and is saved with ``save_hyperparameters()``, so
``ClassificationModule.load_from_checkpoint(path)`` needs nothing else. The shared machinery (EMA, optimizer,
schedule, numerics, compile) is vittm.training.module's; timm's Mixup and losses and torchmetrics' accuracy do
the rest.

Metric names: ``train/loss``, ``val/memory_acc1``, ``val/process_acc5``, ``val_ema/memory_acc1``, ``test/...``, and
``val/acc1``/``val/acc5`` for what ``model(x)`` returns (the ``eval_head`` of a ViTTM, the logits of a baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vittm.data import ImageDataModule
from vittm.models import ViTTM, WeightsReport, create_model, load_weights
from vittm.training.module import TrainingModule, apply_freeze
from vittm.training.trainer import plain


class ClassificationModule(TrainingModule):
    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any],
        schedule: dict[str, Any],
        loss: dict[str, Any],
        augment: dict[str, Any] | None = None,
        ema: dict[str, Any] | None = None,
        freeze: str = "none",
        compile: bool | str = False,
        log_grad_norm: bool = False,
        nonfinite: str = "stop",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = create_model(**model)
        self.num_classes = model["num_classes"]
        self.two_heads = isinstance(self.net, ViTTM)
        self.init_training()

        aug = augment or {}
        mixing = aug.get("mixup", 0) > 0 or aug.get("cutmix", 0) > 0
        smoothing = loss.get("label_smoothing", 0.0)
        self.mixup = Mixup(
            mixup_alpha=aug.get("mixup", 0.0), cutmix_alpha=aug.get("cutmix", 0.0), prob=aug.get("mix_prob", 1.0),
            switch_prob=0.5, mode="batch", label_smoothing=smoothing, num_classes=self.num_classes,
        ) if mixing else None
        if loss["name"] == "bce":
            self.criterion = BinaryCrossEntropy(
                smoothing=0.0 if mixing else smoothing,  # Mixup already smoothed the targets
                target_threshold=loss.get("target_threshold"), sum_classes=loss.get("sum_classes", False),
            )
        elif mixing:
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)

        k = min(5, self.num_classes)
        self.metrics = nn.ModuleDict()
        prefixes = ("val", "val_ema", "test", "test_ema") if self.ema is not None else ("val", "test")
        for prefix in prefixes:
            for head in self.head_names + [""]:
                for top in (1, 5):
                    self.metrics[self.metric_key(prefix, head, top)] = MulticlassAccuracy(
                        self.num_classes, top_k=min(top, k), average="micro"
                    )
            self.metrics[f"{prefix}|loss"] = MeanMetric()

    @property
    def head_names(self) -> list[str]:
        return ["memory", "process"] if self.two_heads else []

    @property
    def supervised_heads(self) -> list[str]:
        """The heads whose losses are summed: both (SPEC §3), or one (``loss.heads=memory``: the supervision of a
        one-head ViT, for matched comparisons); a baseline's only output is ``""``."""
        chosen = self.hparams.loss.get("heads", "all")
        return (self.head_names if chosen == "all" else [chosen]) if self.two_heads else [""]

    @staticmethod
    def metric_key(prefix: str, head: str, top: int) -> str:
        return f"{prefix}|{head + '_' if head else ''}acc{top}"  # ModuleDict keys cannot hold "/"

    def _logits(self, net: nn.Module, x: torch.Tensor) -> Any:
        return net.forward_both(x) if self.two_heads else net(x)

    def outputs(self, x: torch.Tensor, ema: bool = False) -> dict[str, torch.Tensor]:
        """Logits by head name, plus ``""`` for what ``model(x)`` returns; of the EMA model with ``ema``."""
        raw = self._call(self.__dict__["_run_ema" if ema else "_run"], x)
        if not self.two_heads:
            return {"": raw}
        memory, process = raw
        evaluated = {"memory": memory, "process": process, "mean": (memory + process) / 2}[self.net.eval_head]
        return {"memory": memory, "process": process, "": evaluated}

    def load_pretrained(self, path: str) -> WeightsReport:
        """Fine-tuning start: the weights in ``path`` (any format vittm.models.loading reads; the EMA weights of a
        checkpoint that has them), both heads kept if their class count is the data's, else fresh; the EMA restarts
        from the loaded weights."""
        report = load_weights(self.net, path, key="finetune.from_ckpt")
        apply_freeze(self.net, self.hparams.freeze)
        self.ema = self._new_ema()
        return report

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        out = self.outputs(x)
        losses = {h: self.criterion(out[h], target) for h in self.supervised_heads}
        loss = sum(losses.values())
        if not self.training_loss(loss, batch_idx):
            return None  # Lightning skips backward and this micro-batch's share of the update
        if self.two_heads:
            self.log_dict({f"train/{h}_loss": v for h, v in losses.items()})
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> None:
        self._score(batch, "test")  # the test split, once at the end (vittm.data.datamodule: three splits)

    def _score(self, batch: tuple[torch.Tensor, torch.Tensor] | None, stage: str) -> None:
        """Top-1/top-5 of every head and the loss, live and EMA, logged as ``<stage>/...`` and ``<stage>_ema/...``."""
        if batch is None:  # every image of this batch was unreadable (vittm.data.bad_images)
            return
        x, y = batch
        nets = [(stage, False)] + ([(f"{stage}_ema", True)] if self.ema is not None else [])
        for prefix, ema in nets:
            out = self.outputs(x, ema)
            heads = self.head_names or [""]
            # weighted by batch size: the mean over images, whatever the batches and ranks
            self.metrics[f"{prefix}|loss"].update(sum(F.cross_entropy(out[h], y) for h in heads), weight=len(y))
            for head, logits in out.items():
                for top in (1, 5):
                    self.metrics[self.metric_key(prefix, head, top)].update(logits, y)
        for key, metric in self.metrics.items():  # logged as Metric objects: Lightning syncs, computes and resets
            if key.split("|")[0] in (stage, f"{stage}_ema"):
                self.log(key.replace("|", "/"), metric, on_step=False, on_epoch=True, prog_bar=key == f"{stage}|acc1")


def stages(result: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(column title, metrics, prefix) of the validation and test columns that have numbers, live and EMA."""
    val, test = result["final"], result.get("test") or {}
    found = [("val", val, "val"), ("val EMA", val, "val_ema"), ("test", test, "test"), ("test EMA", test, "test_ema")]
    return [st for st in found if any(k.startswith(st[2] + "/") for k in st[1])]


class ClassificationTask:
    """What vittm.tasks.run needs to know of classification (``task.name=classification``, the default)."""

    name = "classification"
    module_class = ClassificationModule
    best_suffix = "acc1"  # the best validation scores kept and the value returned to sweepers end with this

    @staticmethod
    def datamodule(cfg: DictConfig) -> L.LightningDataModule:
        data = plain(cfg.data)
        if data["dataset"] == "ffcv":  # imported only here: FFCV is an optional extra
            from vittm.data.ffcv_loader import FFCVDataModule

            return FFCVDataModule(**data, augment=plain(cfg.augment), seed=cfg.seed)
        log = Path(cfg.output_dir) / "bad_images.txt"  # unreadable files, appended by every loader process
        return ImageDataModule(**data, augment=plain(cfg.augment), seed=cfg.seed, bad_image_log=log)

    @staticmethod
    def module_kwargs(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
        model = plain(cfg.model)
        model["num_classes"] = num_classes
        return dict(
            model=model, optimizer=plain(cfg.optimizer), schedule=plain(cfg.schedule), loss=plain(cfg.loss),
            augment=plain(cfg.augment), ema=plain(cfg.ema), freeze=cfg.finetune.freeze, compile=cfg.compile,
            log_grad_norm=cfg.log_grad_norm, nonfinite=cfg.nonfinite,
        )

    @staticmethod
    def monitor(cfg: DictConfig, module: ClassificationModule) -> str:
        return cfg.checkpoint.monitor if module.two_heads else "val/acc1"  # baselines have no memory head

    @staticmethod
    def load_eval_weights(module: ClassificationModule, path: str) -> WeightsReport:
        return load_weights(module.net, path, key="ckpt_path", heads="require")

    @staticmethod
    def input_shape(cfg: DictConfig) -> tuple[int, int, int]:
        return (cfg.data.in_chans, cfg.model.img_size, cfg.model.img_size)

    @staticmethod
    def extra_results(cfg: DictConfig, module: ClassificationModule, datamodule: Any, trainer: Any) -> dict[str, Any]:
        return {}

    @staticmethod
    def table(result: dict[str, Any]) -> list[str]:
        """Top-1/top-5 per head (memory, process, model(x)) on the validation split and, when there is one, test."""
        columns = stages(result)
        lines = [f"{'top-1 / top-5 %':<16}" + "".join(f"{name:>16}" for name, _, _ in columns)]
        for head, key in [("memory", "memory_"), ("process", "process_"), ("model(x)", "")]:
            cells = []
            for _, metrics, prefix in columns:
                acc1, acc5 = metrics.get(f"{prefix}/{key}acc1"), metrics.get(f"{prefix}/{key}acc5")
                cells.append(f"{100 * acc1:>9.2f} {100 * acc5:>6.2f}" if acc1 is not None else f"{'':>16}")
            if any(c.strip() for c in cells):
                lines.append(f"{head:<16}" + "".join(cells))
        return lines
