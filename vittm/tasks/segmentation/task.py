"""What vittm.tasks.run needs to know of segmentation (``task.name=segmentation``): its data module (the ADE20K
layout, vittm.data.segmentation), its LightningModule, what it monitors, its summary table, and the files a run
writes besides metrics.json: ``per_class_iou.csv`` and ``examples.png`` (test scenes, ground truth beside prediction).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from vittm.core.errors import ConfigError
from vittm.core.files import read_weight_file
from vittm.data.segmentation import SegmentationDataModule
from vittm.tasks.segmentation.module import SegmentationModule
from vittm.training.trainer import plain

METRICS = (("mIoU %", "miou"), ("pixel acc %", "pixel_acc"), ("mean acc %", "macc"))


class SegmentationTask:
    name = "segmentation"
    module_class = SegmentationModule
    best_suffix = "miou"

    @staticmethod
    def datamodule(cfg: DictConfig) -> L.LightningDataModule:
        data = plain(cfg.data)
        if data["dataset"] != "ade20k":
            raise ConfigError(f"data.dataset={data['dataset']!r}: task.name=segmentation reads the ADE20K layout "
                              f"(data=ade20k or data=fmnist_scenes)")
        # the training pipeline's keys sit with the data (they are the dataset's: ADE20K's 512 px, the scenes' 64 px);
        # the evaluation window (pipeline.test) is the module's
        pipeline = {k: v for k, v in data.pop("pipeline").items() if k != "test"}
        augment = {**pipeline, "mean": data.pop("mean"), "std": data.pop("std")}
        log = Path(cfg.output_dir) / "bad_images.txt"
        return SegmentationDataModule(**data, augment=augment, seed=cfg.seed, bad_image_log=log)

    @staticmethod
    def module_kwargs(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
        return dict(
            model=plain(cfg.model), decoder=plain(cfg.decoder), num_classes=num_classes,
            optimizer=plain(cfg.optimizer), schedule=plain(cfg.schedule), loss=plain(cfg.loss),
            test=plain(cfg.data.pipeline.test), ema=plain(cfg.ema), compile=cfg.compile,
            log_grad_norm=cfg.log_grad_norm, nonfinite=cfg.nonfinite, class_names=plain(cfg.data.get("class_names")),
            img_size=cfg.data.pipeline.crop_size,
        )

    @staticmethod
    def monitor(cfg: DictConfig, module: SegmentationModule) -> str:
        return cfg.checkpoint.monitor

    @staticmethod
    def load_eval_weights(module: SegmentationModule, path: str) -> str:
        """A whole segmentation network's weights (e.g. a run's exported ``ema_weights.safetensors``), exactly."""
        state = read_weight_file(path, key="ckpt_path")
        missing, unexpected = module.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"ckpt_path={path!r} does not fit this segmentation network: {len(missing)} missing "
                              f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        return f"loaded {len(state)} tensors exactly"

    @staticmethod
    def input_shape(cfg: DictConfig) -> tuple[int, int, int]:
        crop = cfg.data.pipeline.crop_size
        return (cfg.data.in_chans, crop, crop)

    @staticmethod
    def extra_results(cfg: DictConfig, module: SegmentationModule, datamodule: Any, trainer: Any) -> dict[str, Any]:
        """per_class_iou.csv (one row per class, a column per evaluated split) and examples.png."""
        out = Path(cfg.output_dir)
        names = list(getattr(datamodule, "class_names", None) or range(module.num_classes))
        columns = sorted(module.per_class_iou)
        written: dict[str, Any] = {}
        if columns:
            out.mkdir(parents=True, exist_ok=True)
            path = out / "per_class_iou.csv"
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["class", *columns])
                for i, name in enumerate(names):
                    writer.writerow([name, *(_cell(module.per_class_iou[c][i]) for c in columns)])
            written["per_class_iou"] = str(path)
        from vittm.tasks.segmentation.figure import save_examples  # matplotlib: only once a run has finished

        figure = save_examples(module, datamodule, out / "examples.png")
        if figure:
            written["examples"] = str(figure)
        return written

    @staticmethod
    def table(result: dict[str, Any]) -> list[str]:
        val, test = result["final"], result.get("test") or {}
        columns = [("val", val, "val"), ("val EMA", val, "val_ema"), ("test", test, "test"),
                   ("test EMA", test, "test_ema")]
        columns = [c for c in columns if f"{c[2]}/miou" in c[1]]
        lines = [f"{'':<16}" + "".join(f"{name:>10}" for name, _, _ in columns)]
        for title, key in METRICS:
            lines.append(f"{title:<16}" + "".join(f"{100 * m[f'{p}/{key}']:>10.2f}" for _, m, p in columns))
        if result.get("per_class_iou"):
            lines.append(f"per-class IoU: {result['per_class_iou']}")
        if result.get("examples"):
            lines.append(f"test scenes, ground truth beside prediction: {result['examples']}")
        return lines


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{100 * value:.2f}"
