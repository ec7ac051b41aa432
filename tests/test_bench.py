"""The model benchmark (vittm.bench) end to end, and the compile paths the issue asks to keep working.

Timing targets are not asserted here: they live in the benchmark's own output (README "Performance").
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.helpers import CONF, ROOT
from vittm.bench.cost import measure
from vittm.bench.speed import run, write_outputs
from vittm.core.errors import ConfigError
from vittm.models import create_model

# vit_tiny and vittm_tiny at 112 px (divisible by 16 and 28): real twins, so the ratio line is produced too
TINY_BENCH = ["bench.models=[vit_tiny_patch16_224,vittm_tiny]", "bench.img_size=112", "bench.warmup=1",
              "bench.repeats=2", "bench.matmul_size=256", "bench.threads=1"]


def bench_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="bench", overrides=[*TINY_BENCH, *overrides, f"output_dir={tmp_path}"])


def test_bench_rows_and_files(tmp_path):
    cfg = bench_cfg(tmp_path, "bench.batch_sizes=[1,2]")
    rows = run(cfg)
    assert [(r["model"].split()[0], r["batch"]) for r in rows] == [
        ("vit_tiny_patch16_224", 1), ("vit_tiny_patch16_224", 2), ("vittm_tiny", 1), ("vittm_tiny", 2)]
    for r in rows:
        assert r["median_ms"] > 0 and r["images_per_s"] > 0 and r["threads"] == 1
        assert 0 < r["pct_of_matmul"] and r["matmul_gflops"] > 0
        assert r["gmacs_norms"] > r["gmacs"] > 0  # LayerNorms add work on top of the matmuls
    write_outputs(rows, tmp_path, None)
    text = (tmp_path / "bench.md").read_text()
    assert "vittm_tiny 28/28 lin residual / vit_tiny_patch16_224 (inference, batch 1)" in text
    assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.parametrize("override,key", [
    ("bench.device=tpu", "bench.device"), ("bench.dtype=fp8", "bench.dtype"), ("bench.modes=[serve]", "bench.modes"),
    ("bench.batch_sizes=[0]", "bench.batch_sizes"),
    ("bench.compile=fast", "bench.compile"), ("bench.timer=stopwatch", "bench.timer"),
    ("bench.tf32=maybe", "bench.tf32"), ("bench.timer=blocked_autorange bench.min_run_time=0", "bench.min_run_time"),
])
def test_bench_bad_input(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(bench_cfg(tmp_path, *override.split()))


def test_bench_cost_meter_columns_and_blocked_timer(tmp_path):
    """The meter's columns beside the timings (its counts are the model's own, vittm.bench.cost), the authors'
    blocked_autorange timer, and compile=auto resolved (eager on CPU) and said so."""
    cfg = bench_cfg(tmp_path, "bench.modes=[inference,train]", "bench.batch_sizes=[2]", "bench.timer=blocked_autorange",
                    "bench.min_run_time=0.05")
    rows = run(cfg)
    by = {(r["model"].split()[0], r["mode"]): r for r in rows}
    model = create_model("vittm_tiny", img_size=112).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 112, 112)
        assert by["vittm_tiny", "inference"]["kernels"] == measure(lambda: model(x)).kernels
    for r in rows:
        assert r["kernels"] > 0 and r["MB_per_img"] > 0 and r["timer"] == "blocked_autorange"
        assert r["compile"] == "False (auto)" and r["median_ms"] > 0
        assert ("optim_kernels" in r) == (r["mode"] == "train")
    assert by["vittm_tiny", "inference"]["kernels"] > by["vit_tiny_patch16_224", "inference"]["kernels"]
    write_outputs(rows, tmp_path, None)
    text = (tmp_path / "bench.md").read_text()
    assert "| kernels | MB_per_img | optim_kernels | optim_MB |" in text and "timer blocked_autorange" in text


def test_paper_preset_composes_the_authors_protocol(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        b = compose(config_name="bench", overrides=["preset=paper", f"output_dir={tmp_path}"]).bench
    assert (b.dtype, b.tf32, b.compile, b.timer, b.min_run_time, list(b.batch_sizes)) == (
        "fp32", False, False, "blocked_autorange", 8, [128])
    names = [m if isinstance(m, str) else (m.name, m.get("memory_ps"), m.get("process_ps")) for m in b.models]
    assert names == ["vit_base_patch16_224", ("vittm_base", None, None), ("vittm_base", 16, 32)]


@pytest.mark.slow
def test_bench_cli_end_to_end(tmp_path):
    """python -m vittm.bench as a user runs it: both modes, two batch sizes, accuracy file for the plot."""
    results = tmp_path / "acc.csv"
    results.write_text("model,acc1\nvit_tiny_patch16_224,0.75\nvittm_tiny,0.74\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "vittm.bench", *TINY_BENCH, "data.in_chans=1",
         "bench.models=[vit_tiny_patch16_224,vittm_tiny,model/vit_fmnist_p7]", "bench.modes=[inference,train]",
         "bench.batch_sizes=[1,2]",
         f"bench.results={results}", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "out" / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["mode"] for r in rows} == {"inference", "train"}
    # a model-group file, composed with the run's data.* overrides (1 channel here) and labelled by its name
    p7 = [r for r in rows if r["model"] == "vit_fmnist_p7"]
    want = create_model("vit_tiny_patch16_224", patch_size=7, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0,
                        img_size=112, in_chans=1, num_classes=1000)
    assert len(p7) == 4 and float(p7[0]["params_M"]) == round(sum(p.numel() for p in want.parameters()) / 1e6, 2)
    assert re.search(r"vittm_tiny .* / vit_tiny_patch16_224 \(train, batch 2\): [\d.]+x throughput", proc.stdout)
    with Image.open(tmp_path / "out" / "bench.png") as png:
        assert png.width > 1000  # two panels: throughput vs MACs, accuracy vs throughput


def test_lin_model_compiles_fullgraph():
    """No graph breaks: torch.compile(fullgraph=True) of the published-head model, forward and training step, equal
    to eager within float tolerance. Inductor on CPU needs gcc; about a minute on 2 cores."""
    torch.manual_seed(0)
    model = create_model("vittm_test", num_classes=10)
    for p in model.parameters():  # the heads start at zero: give every parameter a value that matters
        p.data.normal_(0, 0.05)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    model.train()
    both = torch.compile(model.forward_both, fullgraph=True)
    sum(out.square().mean() for out in both(x)).backward()
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(out.square().mean() for out in model.forward_both(x)).backward()
    for got, want in zip(fast, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
def test_bench_cuda_bf16_compiled(tmp_path):
    rows = run(bench_cfg(tmp_path, "bench.device=cuda", "bench.dtype=bf16", "bench.compile=true",
                         "bench.modes=[inference,train]", "bench.batch_sizes=[8]", "bench.threads=null"))
    assert len(rows) == 4
    assert all(r["device"] == "cuda" and r["dtype"] == "bf16" and r["compile"] and r["images_per_s"] > 0 for r in rows)
    assert all(r["peak_mem_MB"] > 0 for r in rows)  # torch.cuda.max_memory_allocated


@pytest.mark.gpu
def test_lin_model_bf16_compiled_matches_fp32_on_cuda():
    torch.manual_seed(0)
    model = create_model("vittm_tiny", img_size=112, num_classes=10).cuda()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    x = torch.randn(4, 3, 112, 112, device="cuda")
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = compiled(x).float()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def fake_rows(models: dict[str, tuple[float, float]]) -> list[dict]:
    """bench rows as run() writes them, for the outputs: {model: (GMACs, images/s)}."""
    common = {"mode": "inference", "batch": 8, "params_M": 0.29, "median_ms": 1.0, "iqr_ms": 0.1, "gflops": 1.0,
              "pct_of_matmul": 1.0, "peak_mem_MB": 1.0, "device": "cpu", "dtype": "fp32", "compile": "False",
              "tf32": False, "timer": "round_robin", "channels_last": False, "threads": 1, "matmul_gflops": 50.0}
    return [common | {"model": m, "gmacs": g, "gmacs_norms": g * 1.01, "images_per_s": s}
            for m, (g, s) in models.items()]


MODELS = {"vittm_fmnist 4/7 lin residual": (0.003623456, 12000.0), "vit_fmnist_p7": (0.0042, 9000.0),
          "vittm_tiny 28/28 lin residual": (0.0061, 15000.0), "vit_tiny_patch16_224": (0.0202, 4000.0)}


def test_bench_macs_keep_their_precision(tmp_path):
    write_outputs(fake_rows(MODELS), tmp_path, None)
    with open(tmp_path / "bench.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["gmacs"]) == 0.003623456  # full precision in the CSV
    assert "| 0.00362 |" in (tmp_path / "bench.md").read_text()  # 3 significant figures, not 0.004


def test_bench_plot_colours_and_readable_ticks():
    from matplotlib.pyplot import close

    from vittm.bench.speed import figure

    rows = fake_rows(MODELS)
    fig = figure(rows, {m: 0.8 + i / 100 for i, m in enumerate(MODELS)})
    try:
        fig.canvas.draw()
        left, right = fig.axes
        colour = [{c.get_label(): tuple(c.get_facecolor()[0]) for c in ax.collections} for ax in (left, right)]
        assert colour[0] == colour[1] and len(set(colour[0].values())) == len(MODELS)  # one colour per model
        for ax in fig.axes:
            labels = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
            boxes = [t.get_window_extent() for t in labels]
            assert all(t.get_rotation() == 30 for t in labels)
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        ticks = [t.get_text() for t in left.get_xticklabels() if t.get_text()]
        assert all(len(t.replace("0.", "").lstrip("0")) >= 3 for t in ticks if float(t)), ticks  # 0.00400, not 0.004
    finally:
        close(fig)
