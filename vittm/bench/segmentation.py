"""Segmentation speed as the ViTTM paper reports it (ADE20K: ViT-B 13.8 FPS, ViTTM-B 26.8 FPS, SPEC §8): batch 1, fp32,
the whole test forward of one image to its labels (backbone, decoder, upsampling, sliding window, argmax; the
softmax only where a resize to the annotation's size needs it, vittm.tasks.segmentation.inference), in
``torch.inference_mode()``; MACs of that same forward (attention matmuls counted, vittm.models.flops).

    python -m vittm.bench.segmentation --models vittm_b vit_b --images 20 --threads 2

Presets: ``vittm_b`` is conf/model/vittm_base.yaml with memory_ps 16, process_ps 32 (``lin`` heads, latent_size_scale
4, residual fusion, patch embedder, no memory block), ``vittm_b_28`` the same at 28/28 (the authors' 504 px
setting: ``--img-size 504 --crop 504``), ``vit_b`` timm's ViT-B/16; all with the Segmenter mask decoder (2 layers,
12 heads, d 768), 150 classes, built at the crop size. Timed runs go round-robin over the models, so a machine whose
speed drifts treats them alike; FPS is 1 / median latency, beside images / total time (mmseg's benchmark tool's count,
which a busy spell on a shared machine drags down).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vittm.core.errors import ConfigError
from vittm.models.flops import count_macs, count_params
from vittm.tasks.segmentation import SegmentationNet, predict_labels, slide_inference

VITTM_B = dict(name="vittm_base", memory_ps=16, process_ps=32, rw_head={"name": "lin", "latent_size_scale": 4},
               fusion="residual", process_embed="patch", memory_block="none")
PRESETS: dict[str, dict[str, Any]] = {
    "vittm_b": VITTM_B,
    "vittm_b_28": {**VITTM_B, "memory_ps": 28, "process_ps": 28},
    "vit_b": dict(name="vit_base_patch16_224"),
}
SEGMENTER_B = dict(name="segmenter", n_layers=2, n_heads=12, d_model=768)
QUIET_SHARE = 0.05  # time_many(quiet=True): what other processes may use of one core during a kept round


class SlideForward(nn.Module):
    """The sliding-window forward as a module, for ``count_macs``."""

    def __init__(self, net: SegmentationNet, crop: int, stride: int) -> None:
        super().__init__()
        self.net, self.crop, self.stride = net, crop, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return slide_inference(self.net, x, self.crop, self.stride)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare(model_cfg: Mapping[str, Any], decoder_cfg: Mapping[str, Any], num_classes: int = 150,
            img_size: int = 512, crop: int = 512, stride: int = 480) -> tuple[Callable[[], None], dict[str, Any]]:
    """(one timed step: the test forward of one image, {macs, params, streams}) for a model."""
    net = SegmentationNet(model_cfg, decoder_cfg, num_classes=num_classes, img_size=crop).eval()
    image = torch.randn(1, 3, img_size, img_size)
    info = dict(macs=count_macs(SlideForward(net, crop, stride), (3, img_size, img_size)), params=count_params(net),
                streams="+".join(net.streams))

    def step() -> None:
        with torch.inference_mode():
            predict_labels(net, image, out_size=(img_size, img_size), mode="slide", crop=crop, stride=stride)

    return step, info


def machine_cpu_s() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux /proc/stat); None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed(step: Callable[[], None]) -> tuple[float, float, float]:
    """(wall seconds, this process's CPU seconds, CPU seconds other processes used meanwhile) of one step; the last
    is 0 where the machine's total is unknown."""
    start, cpu, machine = time.perf_counter(), time.process_time(), machine_cpu_s()
    step()
    wall, own = time.perf_counter() - start, time.process_time() - cpu
    after = machine_cpu_s()
    return wall, own, max(after - machine - own, 0.0) if machine is not None and after is not None else 0.0


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def summarise(times: list[tuple[float, float, float]], info: dict[str, Any]) -> dict[str, Any]:
    """``fps`` = 1 / median latency (robust to other work on a shared machine); ``fps_mean`` = images / total time
    (mmseg's count, which a busy spell on the machine drags down); ``cpu_ms``: median CPU time per image over all
    threads."""
    wall, cpu = [t[0] for t in times], [t[1] for t in times]
    return dict(fps=1 / median(wall), fps_mean=len(wall) / sum(wall), latency_ms=1e3 * median(wall),
                min_ms=1e3 * min(wall), cpu_ms=1e3 * median(cpu), **info)


def time_segmentation(model_cfg: Mapping[str, Any], decoder_cfg: Mapping[str, Any] = SEGMENTER_B,
                      num_classes: int = 150, img_size: int = 512, crop: int = 512, stride: int = 480,
                      images: int = 20, warmup: int = 3, threads: int | None = None,
                      quiet: bool = False) -> dict[str, Any]:
    """{fps, fps_mean, latency_ms (median), min_ms, cpu_ms (median), macs (of the sliding-window forward), params,
    streams, threads} of one model's test forward at batch 1, fp32 (module docstring, ``summarise``)."""
    return time_many({"model": model_cfg}, decoder_cfg, num_classes, img_size, crop, stride, images, warmup,
                     threads, quiet)["model"]


def time_many(models: Mapping[str, Mapping[str, Any]], decoder_cfg: Mapping[str, Any] = SEGMENTER_B,
              num_classes: int = 150, img_size: int = 512, crop: int = 512, stride: int = 480, images: int = 20,
              warmup: int = 3, threads: int | None = None, quiet: bool = False) -> dict[str, dict[str, Any]]:
    """``time_segmentation`` for several models, timed round-robin: one step of each per round. ``quiet``: for a
    machine shared with other work, keep only the rounds during which other processes used at most
    ``QUIET_SHARE`` of one core (a busy core stalls every multi-threaded kernel of ours at its barrier); up to
    ``10 * images`` rounds are tried. Each result says how many rounds were ``dropped``."""
    if images < 1 or warmup < 0:
        raise ConfigError(f"images={images}, warmup={warmup}: need images >= 1 and warmup >= 0")
    from vittm.bench.speed import glibc_allocator  # (here: speed.py may import this module)

    glibc_allocator(eager_release=False)  # as speed.py times: freed blocks are reused, no page faults per output
    with num_threads(threads):
        steps = {label: prepare(cfg, decoder_cfg, num_classes, img_size, crop, stride) for label, cfg in models.items()}
        for step, _ in steps.values():
            for _ in range(warmup):
                step()
        times: dict[str, list[tuple[float, float, float]]] = {label: [] for label in steps}
        dropped = 0
        for _ in range(10 * images if quiet else images):
            round_ = {label: timed(step) for label, (step, _) in steps.items()}
            if quiet and any(other > QUIET_SHARE * wall for wall, _, other in round_.values()):
                dropped += 1
                continue
            for label, t in round_.items():
                times[label].append(t)
            if len(times[next(iter(times))]) == images:
                break
        if not times[next(iter(times))]:
            raise RuntimeError(f"no quiet round in {dropped} tries: other processes kept the machine busy")
        threads_used = torch.get_num_threads()
    return {label: {**summarise(times[label], info), "threads": threads_used, "images": len(times[label]),
                    "dropped": dropped} for label, (_, info) in steps.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Segmentation FPS and MACs (batch 1, fp32, sliding window).")
    parser.add_argument("--models", nargs="+", default=["vittm_b", "vit_b"], choices=sorted(PRESETS))
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--stride", type=int, default=480)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--decoder", choices=["segmenter", "linear"], default="segmenter")
    parser.add_argument("--baseline", default="vit_b", help="the row the ratio divides by")
    parser.add_argument("--quiet", action="store_true",
                        help="keep only rounds during which other processes left the CPU alone (shared machines)")
    args = parser.parse_args(argv)
    decoder = SEGMENTER_B if args.decoder == "segmenter" else dict(name="linear")
    rows = time_many({m: PRESETS[m] for m in args.models}, decoder, args.num_classes, args.img_size, args.crop,
                     args.stride, args.images, args.warmup, args.threads, args.quiet)
    base = rows.get(args.baseline, next(iter(rows.values())))
    threads = next(iter(rows.values()))["threads"]
    print(f"{args.img_size}x{args.img_size}, crop {args.crop}, stride {args.stride}, {args.decoder} decoder, "
          f"{args.num_classes} classes, batch 1, fp32, {threads} threads, {base['images']} images "
          f"(+{args.warmup} warm-up)" + (f", {base['dropped']} busy rounds dropped" if args.quiet else ""))
    print("| model | streams | params (M) | GMACs | latency ms (median / min) | FPS (1/median) | FPS ratio | "
          "FPS (images/total) | ratio | CPU ms (median) | MACs ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in rows.items():
        print(f"| {label} | {r['streams']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.2f} | "
              f"{r['latency_ms']:.0f} / {r['min_ms']:.0f} | {r['fps']:.2f} | {r['fps'] / base['fps']:.2f} | "
              f"{r['fps_mean']:.2f} | {r['fps_mean'] / base['fps_mean']:.2f} | {r['cpu_ms']:.0f} | "
              f"{base['macs'] / r['macs']:.2f} |")


if __name__ == "__main__":
    main()
