"""The config tree: option files match the registries, and every option composes and builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import vittm  # noqa: F401
from vittm.core.registry import REGISTRIES
from vittm.training.summary import build_from_config

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_every_group_option_composes():
    # preset: the benchmark's own group (conf/bench.yaml), composed in tests/test_bench.py
    groups = [p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "model_common", "preset")]
    assert set(groups) >= {"model", "rw_head", "fusion", "process_embed", "memory_block", "data", "optimizer",
                           "schedule", "augment", "loss", "trainer", "logger", "experiment"}
    for group in groups:
        for option in options(group):
            cfg = compose_with(f"{group}={option}")
            assert cfg.mode == "train", (group, option)


@pytest.mark.parametrize("family", sorted(REGISTRIES))
def test_option_files_equal_registry_names(family):
    assert options(family) == REGISTRIES[family].names()
    for name in options(family):  # and each file names its own key
        assert compose_with(f"{family}={name}")[family].name == name


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", ["fashion_mnist", "imagenet"])
def test_every_model_option_builds(model, data):
    cfg = compose_with(f"model={model}", f"data={data}")  # channels and classes come from the data
    with torch.device("meta"):
        net = build_from_config(cfg)
    size, chans = cfg.model.img_size, cfg.data.in_chans
    assert net(torch.zeros(1, chans, size, size, device="meta")).shape == (1, cfg.data.num_classes)


@pytest.mark.parametrize(
    "override", [f"{family}={name}" for family in sorted(REGISTRIES) for name in options(family)]
)
def test_every_component_option_builds_and_runs(override):
    cfg = compose_with("model=vittm_test", "model.num_classes=3", override)
    out = build_from_config(cfg)(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_read_write_overrides_from_the_command_line():
    cfg = compose_with("model=vittm_test", "model.read_head=ca", "+model.write_head={name: lca, latent_size_scale: 2}")
    net = build_from_config(cfg)
    assert type(net.layers[0].read).registry_name == "ca"
    assert type(net.layers[0].write).registry_name == "lca"
