"""timm's model contract on our side, pinned in the default suite (timm's own test-suite runs with ``make
timm-contract``): factory device/dtype, what model(x) returns when training, dense features, pruning, unpooled
outputs, torch.fx, TorchScript and torch.export."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor

import vittm  # noqa: F401  (registers the models)


def tiny(**kwargs):
    model = timm.create_model("vittm_test", num_classes=5, **kwargs)
    for head in (model.head, model.process_head):  # heads start at zero, which would block the gradients behind them
        torch.nn.init.normal_(head.weight, std=0.02)
    return model


X = torch.randn(2, 3, 32, 32)


def test_factory_device_and_dtype():
    model = timm.create_model("vittm_base", device="meta", dtype=torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"meta"} and {t.dtype for t in tensors} == {torch.bfloat16}
    model.reset_classifier(3)
    assert model.head.weight.device.type == "meta" and model.head.weight.dtype == torch.bfloat16
    double = timm.create_model("vittm_test", dtype=torch.float64).eval()
    assert double(X.double()).dtype == torch.float64
    with pytest.raises(TypeError):
        timm.create_model("vittm_test", not_a_model_arg=1)


def test_training_mode_returns_the_mean_and_trains_every_parameter():
    model = tiny(memory_block="mlp").train()
    torch.manual_seed(1)
    out = model(X)
    torch.manual_seed(1)
    memory, process = model.forward_both(X)
    torch.testing.assert_close(out, (memory + process) / 2)
    F.cross_entropy(out, torch.tensor([0, 3])).backward()  # a plain timm-style loop
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), model.forward_both(X)[0])  # eval: the eval_head (memory)


@pytest.mark.parametrize(("memory_ps", "process_ps", "order"), [(4, 8, ("memory", "process")),
                                                                 (8, 4, ("process", "memory")),
                                                                 (8, 8, ("memory", "process"))])
def test_feature_info_lists_both_streams_finer_first(memory_ps, process_ps, order):
    model = tiny(memory_ps=memory_ps, process_ps=process_ps)
    info = model.feature_info
    assert [f["stream"] for f in info] == [order[0]] * 2 + [order[1]] * 2
    assert [f["module"] for f in info] == ["layers.0", "layers.1"] * 2
    assert [f["reduction"] for f in info] == sorted(f["reduction"] for f in info)
    maps = model.forward_intermediates(X, intermediates_only=True)
    grid = {"memory": 32 // memory_ps, "process": 32 // process_ps}
    assert [tuple(m.shape) for m in maps] == [(2, 32, grid[f["stream"]], grid[f["stream"]]) for f in info]


def test_forward_intermediates_are_the_layer_outputs():
    model = tiny().eval()
    outputs = []
    for layer in model.layers:
        layer.register_forward_hook(lambda mod, args, out: outputs.append(out))
    with torch.no_grad():
        final, maps = model.forward_intermediates(X)
        tokens = model.forward_intermediates(X, output_fmt="NLC", norm=True, intermediates_only=True)
        features = model.forward_features(X)
    (m0, p0), (m1, p1) = outputs[:2]
    torch.testing.assert_close(maps[0], m0.transpose(1, 2).reshape(2, 32, 8, 8))  # memory, layer 0
    torch.testing.assert_close(maps[3], p1.transpose(1, 2).reshape(2, 32, 4, 4))  # process, layer 1
    torch.testing.assert_close(tokens[1], m1)  # NLC; the memory stream has no final norm
    torch.testing.assert_close(tokens[3], features[1])  # norm=True: the final process norm
    torch.testing.assert_close(final, features)
    with torch.no_grad():
        early = model.forward_intermediates(X, indices=[0, 2], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early, [maps[0], maps[2]])
    with pytest.raises(ValueError, match="output_fmt='NHWC': choose 'NCHW' or 'NLC'"):
        model.forward_intermediates(X, output_fmt="NHWC")


def test_prune_and_features_only():
    model = tiny()
    with torch.no_grad():
        full = model.forward_intermediates(X, intermediates_only=True)
    take = model.prune_intermediate_layers([0, 2])  # both streams of layer 0
    assert take == [0, 1] and len(model.layers) == 1 and len(model.feature_info) == 2
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(X, indices=take, intermediates_only=True),
                                   [full[0], full[2]])
    assert model(X).shape == (2, 64, 32)  # heads pruned: unpooled memory tokens
    features = timm.create_model("vittm_test", features_only=True)
    assert features.feature_info.channels() == [32, 32] and features.feature_info.reduction() == [4, 8]
    assert [tuple(f.shape) for f in features(X)] == [(2, 32, 8, 8), (2, 32, 4, 4)]  # the last layer's streams


def test_unpooled_outputs():
    model = tiny().eval()
    with torch.no_grad():
        memory, process = model.forward_features(X)
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(X), model.fc_norm(memory))  # (B, N_m, D), as timm's ViT (fc_norm kept)
        model.eval_head = "mean"
        assert model(X).shape == (2, 64 + 16, 32)  # both token sets side by side
        model.reset_classifier(7, "avg")
        assert model(X).shape == (2, 7)
    assert timm.create_model("vittm_test", global_pool="", num_classes=0).eval()(X).shape == (2, 64, 32)
    with pytest.raises(ValueError, match="global_pool='token': ViTTM pools by averaging tokens; choose 'avg', or ''"):
        model.reset_classifier(0, "token")


def test_pretrained_cfg_follows_the_model():
    assert timm.create_model("vittm_base", device="meta").pretrained_cfg["min_input_size"] == (3, 112, 112)
    cfg = timm.create_model("vittm_base", device="meta", memory_ps=16, process_ps=32, in_chans=1).pretrained_cfg
    assert cfg["input_size"] == (1, 224, 224) and cfg["min_input_size"] == (1, 128, 128)
    cfg = timm.create_model("vittm_small", device="meta", img_size=448, process_embed="latent").pretrained_cfg
    assert cfg["input_size"] == (3, 448, 448) and cfg["min_input_size"] == (3, 112, 112)


# (tl and dyna heads trace too, but torchvision's create_feature_extractor then trips over its own node naming: it
# matches "layers.0.read.norm" as an unescaped regex against "layers.0.read_norm_1")
@pytest.mark.parametrize("kwargs", [{}, {"fusion": "add_erase"}, {"process_embed": "downsample"}],
                         ids=["published", "size-bound", "downsample"])
def test_fx_trace_keeps_the_input_checks(kwargs):
    model = tiny(**kwargs).eval()
    traced = create_feature_extractor(model, ["head"], tracer_kwargs=dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions()))
    with torch.no_grad():
        torch.testing.assert_close(traced(X)["head"], model.forward_both(X)[0])
        with pytest.raises(ValueError, match="input size 30x30"):
            traced(torch.randn(1, 3, 30, 30))


@pytest.mark.parametrize("kwargs", [
    {"rw_head": "tl", "fusion": "add_erase"}, {"rw_head": "dyna", "memory_block": "conv"},
    {"read_head": "la", "write_head": "lca", "process_embed": "latent"},
], ids=["tl-add_erase", "dyna-conv", "la-lca-latent"])
def test_torchscript_of_every_component(kwargs):
    model = tiny(**kwargs).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(X), model(X))
        with pytest.raises(torch.jit.Error, match="input size 30x30"):  # the scripted model checks its input too
            scripted(torch.randn(1, 3, 30, 30))


def test_torchscript_and_export_round_trip(tmp_path):
    model = tiny().eval()
    with torch.no_grad():
        expected = model(X)
        torch.testing.assert_close(torch.jit.script(model)(X), expected)
        exported = torch.export.export(model, (X,))
        torch.export.save(exported, tmp_path / "vittm.pt2")
        torch.testing.assert_close(torch.export.load(tmp_path / "vittm.pt2").module()(X), expected)
