"""``examples.png``: a few test images, each with its ground truth beside the prediction, in one class palette."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vittm.data.seg_transforms import IGNORE_INDEX as IGNORE
from vittm.tasks.segmentation.inference import predict_labels


def palette(num_classes: int) -> np.ndarray:
    """(K + 1, 3) colours in 0-1: tab20's for up to 20 classes (class 0 black when it is a background), a fixed
    random draw beyond; the last row (ignored pixels) white."""
    import matplotlib

    if num_classes <= 20:
        colours = np.array([matplotlib.colormaps["tab20"](i)[:3] for i in range(num_classes)])
    else:
        colours = np.random.default_rng(0).uniform(0.1, 0.95, size=(num_classes, 3))
    return np.vstack([colours, np.ones((1, 3))])


def colourise(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) class indices (255: ignored) -> (H, W, 3)."""
    index = np.where(labels == IGNORE, len(colours) - 1, labels)
    return colours[index]


@torch.inference_mode()
def save_examples(module: Any, datamodule: Any, path: Path, count: int = 6) -> Path | None:
    """The first ``count`` images of the test split (the validation split when there is none), predicted by the
    module's live network as its ``inference`` setting says; None when there is nothing to show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = datamodule.test_set if datamodule.has_test() else datamodule.val_set
    samples = [s for s in (dataset[i] for i in range(min(len(dataset), 4 * count))) if s is not None][:count]
    if not samples:
        return None
    net = module.net.eval()
    device = next(net.parameters()).device
    names = list(getattr(datamodule, "class_names", None) or range(module.num_classes))
    colours = palette(module.num_classes)
    fig, axes = plt.subplots(len(samples), 3, figsize=(7.5, 2.5 * len(samples)), squeeze=False)
    for row, (image, mask) in zip(axes, samples, strict=True):
        labels = predict_labels(net, image.to(device), out_size=tuple(mask.shape[-2:]), **module.inference)
        shown = image.permute(1, 2, 0).float().cpu().numpy()
        shown = (shown - shown.min()) / max(1e-6, float(shown.max() - shown.min()))  # undo the normalisation
        for ax, picture, title in zip(row, [shown, colourise(mask.cpu().numpy(), colours),
                                            colourise(labels.cpu().numpy(), colours)],
                                      ["image", "ground truth", "prediction"], strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    legend = names if len(names) <= 20 else []  # ADE20K's 150 names would not fit
    handles = [matplotlib.patches.Patch(color=colours[i], label=str(n)) for i, n in enumerate(legend)]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.012 * ((len(handles) + 3) // 4), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
