"""Model benchmark: parameters, MACs (attention counted), latency, throughput, peak memory, achieved FLOP/s.

    python -m vittm.bench bench.models=[vit_base_patch16_224,vittm_base] bench.batch_sizes=[8]     (make bench)

Hydra-composed like run.py (conf/bench.yaml): the ``model``/``rw_head``/``fusion`` groups build the entry ``model``;
other ``bench.models`` entries are timm names at their defaults, so baselines run through the same code, in the same
process. Warm-up runs are excluded; latency is the median (and inter-quartile range) of ``repeats`` timed runs;
threads are pinned and reported. A reference matmul measured in the same run (fp32, or under the same bf16/fp16
autocast as the models) gives the machine's attainable FLOP/s, against which each model's achieved FLOP/s
(2 x MACs x batch / latency) is stated.
Every row also has the cost meter's columns (``vittm.bench.cost``): eager kernels and non-matmul bytes per step, and
inductor's kernel count when compiled. ``bench.timer=blocked_autorange`` times each entry the authors' way instead of
round-robin; ``preset=paper`` is their whole protocol (conf/preset/paper.yaml).
Writes ``bench.csv``, ``bench.md`` and ``bench.png`` (throughput vs MACs, plus accuracy when ``bench.results``
names a file of accuracies) into the run directory.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import json
import threading
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch._inductor import config as inductor_config
from torch._inductor import metrics as inductor_metrics

from vittm.bench.cost import measure
from vittm.core.errors import ConfigError
from vittm.core.figures import colours, significant
from vittm.models import ViTTM, create_model
from vittm.models.flops import count_macs, count_params
from vittm.training.module import COMPILE_MODES, compile_options, is_compile_setting, resolve_compile

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TIMERS = ("round_robin", "blocked_autorange")


def model_config(override: str) -> dict[str, Any]:
    """``model/<file>`` -> that model-group file, composed with this run's ``data.*`` overrides, resolved."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    data = [o for o in HydraConfig.get().overrides.task if o.startswith("data.")]
    group_override = override.replace("/", "=", 1)  # model/vit_fmnist -> model=vit_fmnist
    return OmegaConf.to_container(compose(config_name="bench", overrides=[group_override, *data]).model, resolve=True)


def build(entry: Any, cfg: DictConfig) -> tuple[str, torch.nn.Module]:
    """A ``bench.models`` entry -> (label, model)."""
    if entry == "model":
        kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    elif isinstance(entry, str) and entry.startswith("model/"):  # another model-group file, e.g. model/vit_fmnist
        kwargs = {"label": entry.removeprefix("model/"), **model_config(entry)}
    elif isinstance(entry, str):
        kwargs = {"name": entry}
    else:
        kwargs = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
    name = kwargs.pop("name")
    label = kwargs.pop("label", name)  # dict entries may name themselves: {name: vit_tiny_patch16_224, label: ...}
    kwargs.update(img_size=cfg.bench.img_size)
    model = create_model(name, **kwargs)
    if isinstance(model, ViTTM) and label == name:  # the ViTTM options that define it
        read = type(model.layers[0].read).registry_name
        label += f" {model.memory_ps}/{model.process_ps} {read} {type(model.layers[0].read_fuse).registry_name}"
    return label, model


def glibc_allocator(eager_release: bool) -> None:
    """eager_release: glibc hands every freed block back to the OS at once, so RSS follows live memory (for PeakRSS;
    each allocation then costs page faults). Otherwise freed memory is kept for reuse (for timing)."""
    threshold = 64 * 1024 if eager_release else 1 << 30
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixed: no dynamic adjustment)
        libc.mallopt(-1, threshold)  # M_TRIM_THRESHOLD
        if eager_release:
            libc.malloc_trim(0)


class PeakRSS:
    """Peak resident memory of this process while the block runs, above its level at entry (CPU runs): what the
    warm-up and timed steps allocate (activations; for training also gradients and optimizer state)."""

    def __init__(self) -> None:
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def megabytes(self) -> float:
        return (self.peak - self.base) / 2**20


def timed_once(fn, sync) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def step_fn(model: torch.nn.Module, x: torch.Tensor, mode: str, autocast, compile_: dict | None):
    """One inference forward, or one training step (both heads' losses for a ViTTM) with AdamW (``foreach``).
    ``compile_``: torch.compile options, or None for eager; what runs is compiled (``forward_both`` for a ViTTM's
    training step, which a compiled module's plain call would not reach). Returns ``(step, parts)``: ``parts`` are
    the eager callables the cost meter counts, ``{"forward": ...}`` or ``{"forward_backward": ..., "optimizer": ...}``.
    """
    if mode == "inference":
        model.eval()
        runner = torch.compile(model, **compile_) if compile_ is not None else model

        def run_with(fn, no_autograd=torch.inference_mode) -> None:
            with no_autograd(), autocast():
                fn(x)

        # counted under no_grad: under inference_mode composite ops (linear, layer_norm, ...) reach the meter
        # before they decompose, so the count would not compare with a training step's
        return (lambda: run_with(runner)), {"forward": lambda: run_with(model, torch.no_grad)}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    target = torch.zeros(len(x), dtype=torch.long, device=x.device)
    eager = model.forward_both if isinstance(model, ViTTM) else lambda inp: (model(inp),)
    forward = torch.compile(eager, **compile_) if compile_ is not None else eager

    def forward_backward(fn) -> None:
        with autocast():
            loss = sum(F.cross_entropy(out.float(), target) for out in fn(x))
        loss.backward()

    def update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def train() -> None:
        forward_backward(forward)
        update()

    return train, {"forward_backward": lambda: forward_backward(eager), "optimizer": update}


def meter_columns(parts: dict[str, Any], batch: int, sync) -> dict[str, Any]:
    """The cost meter's columns for one entry (its eager kernels and non-matmul bytes, see vittm.bench.cost), counted
    on a step run after the warm-up, so the optimizer's state already exists (a steady-state step)."""
    if "forward" in parts:
        cost = measure(parts["forward"])
        return {"kernels": cost.kernels, "MB_per_img": round(cost.bytes / batch / 1e6, 2)}
    fb = measure(parts["forward_backward"])
    opt = measure(parts["optimizer"])
    sync()
    return {"kernels": fb.kernels + opt.kernels, "MB_per_img": round(fb.bytes / batch / 1e6, 2),
            "optim_kernels": opt.kernels, "optim_MB": round(opt.bytes / 1e6, 1)}


def time_blocked(fn, min_run_time: float) -> list[float]:
    """The authors' protocol (their benchmark.py): torch.utils.benchmark's ``blocked_autorange`` over a window of
    ``min_run_time`` seconds; the per-run times of its blocks."""
    from torch.utils import benchmark

    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return list(measurement.times)


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every (model, mode, batch) is warmed up alone (its peak memory measured then), after which the timed runs go
    round-robin over all of them and the reference matmul: on a shared machine whose speed drifts, every entry sees
    the same conditions, so the ratios between them hold."""
    b = cfg.bench
    if b.device not in ("cpu", "cuda") or (b.device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"bench.device={b.device!r}: choose cpu, or cuda on a machine with a GPU")
    if b.dtype not in DTYPES:
        raise ConfigError(f"bench.dtype={b.dtype!r}: choose one of {list(DTYPES)}")
    bad_modes = [m for m in b.modes if m not in ("inference", "train")]
    if bad_modes or not b.models or not b.batch_sizes or min(b.batch_sizes) < 1:
        raise ConfigError("bench.modes must be inference/train, bench.models and bench.batch_sizes non-empty (>= 1)")
    if not is_compile_setting(b.compile, auto=True):
        raise ConfigError(f"bench.compile={b.compile!r}: choose auto, true, false or a torch.compile mode "
                          f"{COMPILE_MODES}")
    if b.timer not in TIMERS:
        raise ConfigError(f"bench.timer={b.timer!r}: choose one of {list(TIMERS)}")
    if b.timer == "blocked_autorange" and not b.min_run_time > 0:
        raise ConfigError(f"bench.min_run_time={b.min_run_time!r}: a positive number of seconds")
    if b.tf32 not in (None, True, False):
        raise ConfigError(f"bench.tf32={b.tf32!r}: choose null (PyTorch's defaults), true or false")
    if b.threads:
        torch.set_num_threads(int(b.threads))
    device = torch.device(b.device)
    if b.tf32 is not None:  # fp32 GEMMs and convolutions on a GPU
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(b.tf32)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    compile_setting = resolve_compile(b.compile, cuda=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = DTYPES[b.dtype]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    glibc_allocator(eager_release=True)  # while warming up: peak memory per entry
    entries = []  # (row stub, step function)
    for entry in b.models:
        label, model = build(entry, cfg)
        first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))  # the patch embedding
        size = (first_conv.in_channels, b.img_size, b.img_size)
        params, macs = count_params(model), count_macs(model, size)
        macs_norms = count_macs(model, size, count_norms=True)
        model = model.to(device)
        if b.channels_last:
            model = model.to(memory_format=torch.channels_last)
        compile_ = compile_options(compile_setting, fullgraph=b.fullgraph)
        for mode in b.modes:
            for batch in b.batch_sizes:
                x = torch.randn(batch, *size, device=device)
                if b.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                fn, parts = step_fn(model, x, mode, autocast, compile_)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                generated = inductor_metrics.generated_kernel_count if compile_ is not None else 0
                # compiled afresh (no FX-graph cache hit, which would generate nothing) so that the count is real
                with PeakRSS() as rss, inductor_config.patch(fx_graph_cache=False):
                    for _ in range(b.warmup):
                        timed_once(fn, sync)
                memory = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss.megabytes
                stub = {"model": label, "mode": mode, "batch": batch, "params_M": round(params / 1e6, 2),
                        "gmacs": macs / 1e9, "gmacs_norms": macs_norms / 1e9,  # unrounded: a tiny model's 0.00362
                        "peak_mem_MB": round(memory, 1)}
                if b.meter:
                    stub |= meter_columns(parts, batch, sync)
                if compile_ is not None:  # kernels inductor generated while compiling this entry (warm-up)
                    stub["inductor_kernels"] = inductor_metrics.generated_kernel_count - generated
                entries.append((stub, fn, macs * batch * (3 if mode == "train" else 1)))  # backward ≈ 2x forward
    glibc_allocator(eager_release=False)  # while timing: memory reused, no page faults
    n = b.matmul_size
    left, right = torch.randn(n, n, device=device), torch.randn(n, n, device=device)

    def matmul() -> None:  # under the models' autocast: the attainable rate of the dtype they compute in
        with autocast():
            left @ right

    timed_once(matmul, sync)
    times: list[list[float]] = [[] for _ in entries]
    matmul_times = []
    if b.timer == "blocked_autorange":  # one entry after another, each over its own window (the paper's protocol)
        matmul_times = time_blocked(lambda: (matmul(), sync()), b.min_run_time)
        times = [time_blocked(lambda fn=fn: (fn(), sync()), b.min_run_time) for _, fn, _ in entries]
    else:
        for _ in range(b.repeats):
            matmul_times.append(timed_once(matmul, sync))
            for i, (_, fn, _) in enumerate(entries):
                times[i].append(timed_once(fn, sync))
    peak = 2 * n**3 / float(np.median(matmul_times)) / 1e9
    rows = []
    for (stub, _, macs_per_step), ts in zip(entries, times, strict=True):
        median = float(np.median(ts))
        q1, q3 = np.percentile(ts, [25, 75])
        gflops = 2 * macs_per_step / median / 1e9
        rows.append(stub | {
            "median_ms": round(1000 * median, 2), "iqr_ms": round(1000 * (q3 - q1), 2),
            "images_per_s": round(stub["batch"] / median, 2), "gflops": round(gflops, 1),
            "pct_of_matmul": round(100 * gflops / peak, 1), "device": b.device, "dtype": b.dtype,
            "compile": compile_label(b.compile, compile_setting), "tf32": tf32, "timer": b.timer,
            "channels_last": b.channels_last, "threads": torch.get_num_threads(), "matmul_gflops": round(peak, 1),
        })
    return rows


def compile_label(setting: Any, resolved: Any) -> str:
    """What ran, and why: ``reduce-overhead (auto)`` when ``auto`` chose it."""
    return f"{resolved} (auto)" if setting == "auto" else str(resolved)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """ViTTM-X over ViT-X/16 throughput, where both ran with the same mode and batch."""
    lines = []
    for row in rows:
        name = row["model"].split()[0]
        if not name.startswith("vittm_"):
            continue
        twin = f"vit_{name.removeprefix('vittm_')}_patch16_224"
        for other in rows:
            if other["model"] == twin and (other["mode"], other["batch"]) == (row["mode"], row["batch"]):
                lines.append(f"{row['model']} / {twin} ({row['mode']}, batch {row['batch']}): "
                             f"{row['images_per_s'] / other['images_per_s']:.2f}x throughput, "
                             f"{other['gmacs'] / row['gmacs']:.2f}x fewer MACs")
    return lines


def write_outputs(rows: list[dict[str, Any]], out: Path, results: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # train rows add the optimizer's columns
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    cols = ["model", "mode", "batch", "params_M", "gmacs", "median_ms", "iqr_ms", "images_per_s", "gflops",
            "pct_of_matmul", "peak_mem_MB"]
    cols += [c for c in ("kernels", "MB_per_img", "optim_kernels", "optim_MB", "inductor_kernels")
             if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    r0 = rows[0]
    tf32 = "on" if r0["tf32"] else "off"
    lines += ["", f"{r0['device']} {r0['dtype']}, compile={r0['compile']}, TF32 matmul {tf32}, "
                  f"channels_last={r0['channels_last']}, {r0['threads']} threads, timer {r0['timer']}; reference "
                  f"{r0['dtype']} matmul {r0['matmul_gflops']} GFLOP/s", ""]
    if "kernels" in r0:
        lines += ["kernels: eager ATen kernels per inference forward or per training step (forward, backward and "
                  "AdamW step; optim_kernels of them the optimizer's); MB_per_img: bytes written by non-matmul ops "
                  "per image (a training step's forward and backward; optim_MB: the optimizer's per step); "
                  "inductor_kernels: kernels inductor generated for the compiled entry (vittm.bench.cost)", ""]
    lines += ratios(rows)
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "bench.png", load_accuracy(results))


def cell(row: dict[str, Any], col: str) -> str:
    """A bench.md cell: MACs to 3 significant figures (the row keeps them exact, as does bench.csv)."""
    value = row.get(col, "")
    return significant(value) if col in ("gmacs", "gmacs_norms") and isinstance(value, float) else str(value)


def load_accuracy(path: str | None) -> dict[str, float]:
    """``{model: acc1}`` from a CSV (columns model, acc1) or JSON list/dict; empty without a file."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"bench.results={path!r} does not exist")
    if file.suffix == ".json":
        data = json.loads(file.read_text())
        return data if isinstance(data, dict) else {r["model"]: float(r["acc1"]) for r in data}
    with open(file) as f:
        return {r["model"]: float(r["acc1"]) for r in csv.DictReader(f)}


def figure(rows: list[dict[str, Any]], accuracy: dict[str, float]):
    """Throughput vs MACs of the first (mode, batch), and accuracy vs throughput when ``accuracy`` has any: one
    colour per model, the same in both panels."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    shown = [r for r in rows if r["mode"] == rows[0]["mode"] and r["batch"] == rows[0]["batch"]]
    palette = colours([r["model"] for r in shown])
    panels = 2 if accuracy else 1
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 5.5), squeeze=False, layout="constrained")
    ax = axes[0][0]
    for r in shown:
        ax.scatter(r["gmacs"], r["images_per_s"], color=palette[r["model"]], label=r["model"])
        ax.annotate(f"{r['model']}\n{significant(r['gmacs'])} GMACs", (r["gmacs"], r["images_per_s"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: significant(v)))  # 0.00362, not 0.004 or an offset
    ax.set(xlabel="GMACs per image", ylabel="images / s", title=f"{shown[0]['mode']}, batch {shown[0]['batch']}, "
           f"{shown[0]['device']} {shown[0]['dtype']}")
    if accuracy:
        ax = axes[0][1]
        for r in shown:
            acc = accuracy.get(r["model"], accuracy.get(r["model"].split()[0]))
            if acc is not None:
                ax.scatter(r["images_per_s"], acc, color=palette[r["model"]], label=r["model"])
                ax.annotate(r["model"], (r["images_per_s"], acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="images / s", ylabel="top-1 accuracy", title="accuracy vs throughput")
    for ax in axes[0]:
        ax.tick_params(axis="x", labelrotation=30)  # long tick labels (0.00362, 12000) would run into each other
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")  # each label ends under its tick
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plot(rows: list[dict[str, Any]], path: Path, accuracy: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(rows, accuracy)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    try:
        rows = run(cfg)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    out = Path(cfg.output_dir)
    write_outputs(rows, out, cfg.bench.results)
    print("\n" + (out / "bench.md").read_text())
    print(f"written: {out / 'bench.csv'}, {out / 'bench.md'}, {out / 'bench.png'}")


if __name__ == "__main__":
    main()
