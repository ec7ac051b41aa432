"""Segmentation network, decoders, inference and metrics (vittm.tasks.segmentation) on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vittm  # noqa: F401  (registers the ViTTM entrypoints)
from vittm.core.errors import ConfigError
from vittm.models import create_model
from vittm.tasks.segmentation import (
    DECODERS,
    SegmentationMetrics,
    SegmentationNet,
    predict,
    predict_labels,
    slide_inference,
    whole_inference,
)
from vittm.tasks.segmentation.inference import window_starts

AUTHORS = Path(__file__).parent / "data" / "authors"
K = 5
# D 32, 2 layers, 32 px: memory 8x8 and process 4x4 (unequal), or both 8x8 (equal)
VITTM_UNEQUAL = dict(name="vittm_test")
VITTM_EQUAL = dict(name="vittm_test", process_ps=4)
VIT = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
BACKBONES = {"vittm_unequal": VITTM_UNEQUAL, "vittm_equal": VITTM_EQUAL, "vit": VIT}
SEGMENTER = dict(name="segmenter", n_layers=2, n_heads=2)
DECODER_SPECS = {"segmenter": SEGMENTER, "linear": dict(name="linear")}
STREAMS = {"vittm_unequal": ("process",), "vittm_equal": ("memory", "process"), "vit": ("tokens",)}


def make(backbone: str = "vittm_unequal", decoder: str = "segmenter", **kwargs) -> SegmentationNet:
    return SegmentationNet(BACKBONES[backbone], DECODER_SPECS[decoder], num_classes=K, **kwargs)


# --------------------------------------------------------------------------------------------- the network
@pytest.mark.parametrize("decoder", sorted(DECODER_SPECS))
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_shapes_and_every_parameter_trains(backbone, decoder):
    net = make(backbone, decoder)
    assert net.streams == STREAMS[backbone]
    assert net.feature_dim == 32 * len(net.streams)
    x = torch.randn(2, 3, 32, 32)
    logits = net(x)
    assert logits.shape == (2, K, 32, 32)
    F.cross_entropy(logits, torch.randint(0, K, (2, 32, 32))).backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert unused == []  # the pruning left nothing that DDP would call unused
    first_backbone = next(p for n, p in net.named_parameters() if n.startswith("backbone."))
    assert first_backbone.grad.abs().sum() > 0 and net.decoder.parameters().__next__().grad.abs().sum() > 0
    assert set(net.backbone_param_names()) == {n for n, _ in net.named_parameters() if n.startswith("backbone.")}


def test_features_are_the_full_models_last_layer_before_the_final_norm():
    """The pruned backbone (no heads, no final process norm, no last write) gives the full model's taps."""
    x = torch.randn(2, 3, 32, 32)
    for backbone in ("vittm_unequal", "vittm_equal", "vit"):
        net = make(backbone).eval()
        full = create_model(**net.backbone_cfg).eval()
        missing, unexpected = full.load_state_dict(net.backbone.state_dict(), strict=False)
        assert not unexpected
        with torch.no_grad():
            if backbone == "vit":
                want = full.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
            else:
                L = len(full.layers)
                taps = [full.tap_streams.index(s) * L + L - 1 for s in ("memory", "process") if s in net.streams]
                maps = dict(zip([full.tap_streams[t // L] for t in sorted(taps)],
                                full.forward_intermediates(x, indices=sorted(taps), intermediates_only=True),
                                strict=True))
                want = torch.cat([maps[s] for s in ("memory", "process") if s in maps], dim=1)
            torch.testing.assert_close(net.features(x), want, rtol=0, atol=1e-6)
        if backbone == "vittm_unequal":  # what was pruned: the final process norm and the last layer's write
            assert "process_norm.weight" in missing and any(k.startswith("layers.1.write.") for k in missing)
        if backbone == "vit":  # a ViT's features are normed: its final norm stays
            assert "norm.weight" in net.backbone.state_dict()


def test_feature_choice():
    assert make("vittm_unequal", features="memory").streams == ("memory",)
    assert make("vittm_unequal", features="process").streams == ("process",)
    assert make("vittm_equal", features="process").feature_dim == 32
    both = make("vittm_unequal", features="both")  # unequal grids: the 4x4 process map resized onto the 8x8 grid
    assert both.streams == ("memory", "process") and both.feature_dim == 64
    assert both(torch.randn(1, 3, 32, 32)).shape == (1, K, 32, 32)
    # in the decoder spec, as conf/decoder/*.yaml may put it
    assert SegmentationNet(VITTM_EQUAL, {**SEGMENTER, "features": "memory"}, K).streams == ("memory",)
    with pytest.raises(ConfigError, match=r"decoder\.features='proces'"):
        make(features="proces")
    with pytest.raises(ConfigError, match=r"decoder\.features='memory'.*baseline"):
        make("vit", features="memory")
    with pytest.raises(ConfigError, match="disagrees"):
        SegmentationNet(VITTM_EQUAL, {**SEGMENTER, "features": "memory"}, K, features="process")


def test_decoder_config_errors():
    for spec, match in (
        ({**SEGMENTER, "d_model": 30, "n_heads": 4}, r"decoder\.d_model=30.*decoder\.n_heads=4"),
        ({**SEGMENTER, "n_layers": 0}, r"decoder\.n_layers=0"),
        ({**SEGMENTER, "drop_path": 1.5}, r"decoder\.drop_path=1\.5"),
        ({**SEGMENTER, "in_dim": 7}, r"decoder\.in_dim=7"),
        ({"name": "segmentr"}, r"decoder='segmentr'.*did you mean 'segmenter'"),
        ({"name": "linear", "n_layers": 2}, r"no option \['n_layers'\]"),
    ):
        with pytest.raises(ConfigError, match=match):
            SegmentationNet(VITTM_UNEQUAL, spec, K)
    with pytest.raises(ConfigError, match="num_classes=0"):
        SegmentationNet(VITTM_UNEQUAL, SEGMENTER, 0)
    with pytest.raises(ConfigError, match="model:"):
        SegmentationNet({**VITTM_UNEQUAL, "memory_ps": 5}, SEGMENTER, K)
    assert DECODERS.names() == ["linear", "segmenter"]


def test_segmenter_decoder_as_mmseg():
    net = make("vittm_equal")  # two streams: in_dim 64, d_model the backbone's width 32
    dec = net.decoder
    assert dec.proj_in.in_features == 64 and dec.d_model == 32 and dec.cls_emb.shape == (1, K, 32)
    assert dec.patch_proj.bias is None and dec.classes_proj.bias is None
    assert all(m.eps == 1e-5 for m in dec.modules() if isinstance(m, nn.LayerNorm))
    assert [type(b.drop_path2).__name__ for b in dec.blocks] == ["Identity", "DropPath"]  # linspace(0, 0.1, 2)
    masks = dec.eval()(torch.randn(2, 64, 8, 8))
    assert masks.shape == (2, K, 8, 8)
    # mask_norm (1/0 at init) normalises each pixel's K scores
    torch.testing.assert_close(masks.mean(1), torch.zeros(2, 8, 8), atol=1e-5, rtol=0)
    assert "decoder.cls_emb" in net.no_weight_decay() and "backbone.memory_pos_embed" in net.no_weight_decay()


def test_input_size_must_be_a_multiple():
    net = make()
    assert net.size_multiple == 8 and net.patch_sizes == {"memory_ps": 4, "process_ps": 8}
    with pytest.raises(ValueError, match="multiple of 8"):
        net(torch.randn(1, 3, 36, 36))
    assert make("vit").size_multiple == 8


# ---------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("backbone", ["vittm_unequal", "vit"])
def test_slide_equals_whole_when_one_window_covers_the_image(backbone):
    net = make(backbone).eval()
    with torch.no_grad():
        for size, crop in (((32, 32), 32), ((32, 48), 48), ((24, 40), (32, 48))):
            image = torch.randn(2, 3, *size)
            whole = whole_inference(net, image)
            assert whole.shape == (2, K, *size)
            torch.testing.assert_close(slide_inference(net, image, crop, 16, num_classes=K), whole, rtol=0, atol=1e-5)
        # sizes the network cannot cut: padded, then cropped back
        assert whole_inference(net, torch.randn(1, 3, 30, 45)).shape == (1, K, 30, 45)
        assert slide_inference(net, torch.randn(1, 3, 50, 45), 32, 24).shape == (1, K, 50, 45)


class WindowIndex(nn.Module):
    """Returns, for the n-th window it sees, n everywhere (1 class); records the windows' sizes."""

    size_multiple = 1

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape[-2:]))
        return torch.full((x.shape[0], 1, *x.shape[-2:]), float(len(self.calls) - 1))


def test_slide_averages_overlapping_windows():
    assert window_starts(683, 512, 480) == [0, 171]  # mmseg: ceil((683 - 512) / 480) + 1 windows, the last moved back
    assert window_starts(512, 512, 480) == [0] and window_starts(300, 512, 480) == [0]
    assert window_starts(10, 6, 4) == [0, 4] and window_starts(11, 6, 2) == [0, 2, 4, 5]
    net = WindowIndex()
    out = slide_inference(net, torch.zeros(1, 3, 10, 6), crop=6, stride=4)  # rows [0, 6) and [4, 10), one column
    assert net.calls == [(6, 6), (6, 6)]
    want = torch.tensor([0.0] * 4 + [0.5] * 2 + [1.0] * 4).view(10, 1).expand(10, 6)
    torch.testing.assert_close(out[0, 0], want)
    # windows land on their own pixels: an identity network gives the image back
    image = torch.randn(2, 3, 23, 17)
    torch.testing.assert_close(slide_inference(lambda x: x, image, crop=(8, 6), stride=(5, 4)), image)
    # a window taller than the image: it covers the whole height, unpadded (multiple 1)
    net = WindowIndex()
    slide_inference(net, torch.zeros(1, 3, 5, 20), crop=8, stride=6)
    assert net.calls == [(5, 8), (5, 8), (5, 8)]


def test_padding_is_cropped_back():
    seen = []

    class Cut8(nn.Module):
        size_multiple = 8

        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            assert x.shape[-2] % 8 == 0 and x.shape[-1] % 8 == 0
            return x[:, :2]

    image = torch.randn(1, 3, 13, 21)
    torch.testing.assert_close(whole_inference(Cut8(), image), image[:, :2])
    assert seen == [(16, 24)]
    torch.testing.assert_close(whole_inference(lambda x: x[:, :2] * 1, torch.randn(1, 3, 16, 16), multiple=8).shape,
                               torch.Size([1, 2, 16, 16]))


def test_predict():
    net = make().eval()
    image = torch.randn(3, 40, 56)
    with torch.no_grad():
        probs = predict(net, image, out_size=(30, 70), mode="slide", crop=32, stride=16)
        assert probs.shape == (K, 30, 70)
        torch.testing.assert_close(probs.sum(0), torch.ones(30, 70))
        logits = predict(net, image, mode="whole", softmax=False)
        torch.testing.assert_close(logits, whole_inference(net, image[None])[0])
        labels = predict_labels(net, image[None], out_size=(40, 56), mode="slide", crop=32, stride=16)
        assert labels.shape == (1, 40, 56) and labels.dtype == torch.long
        torch.testing.assert_close(labels, predict(net, image[None], mode="slide", crop=32, stride=16).argmax(1))
    with pytest.raises(ConfigError, match=r"inference\.mode='sliding'"):
        predict(net, image, mode="sliding")
    with pytest.raises(ConfigError, match=r"inference\.stride=40"):
        slide_inference(net, image[None], crop=32, stride=40)
    with pytest.raises(ConfigError, match=r"inference\.crop=None"):
        slide_inference(net, image[None], crop=None, stride=16)


# ------------------------------------------------------------------------------------------------ metrics
def mmseg_metrics(pred, target, num_classes, ignore=255):
    """mmseg's IoUMetric.intersect_and_union + total_area_to_metrics, restated with histc."""
    keep = target != ignore
    pred, target = pred[keep].float(), target[keep].float()
    hist = lambda v: torch.histc(v, bins=num_classes, min=0, max=num_classes - 1).double()  # noqa: E731
    inter, area_pred, area_label = hist(pred[pred == target]), hist(pred), hist(target)
    iou, acc = inter / (area_pred + area_label - inter), inter / area_label
    return dict(miou=iou.nanmean().item(), macc=acc.nanmean().item(),
                pixel_acc=(inter.sum() / area_label.sum()).item(), iou=iou)


def test_metrics_hand_computed():
    target = torch.tensor([[[0, 0, 1, 255], [1, 1, 0, 0]]])
    pred = torch.tensor([[[0, 1, 1, 2], [1, 1, 0, 2]]])
    metric = SegmentationMetrics(num_classes=4)
    metric.update(pred, target)
    out = metric.compute()
    # class 0: 2 of 4 targets hit, predicted twice -> 2/4; class 1: 3 hits, 4 predicted -> 3/4;
    # class 2: predicted once (its other prediction is on an ignored pixel), never a target -> IoU 0, Acc NaN;
    # class 3: neither -> NaN (left out of the means)
    torch.testing.assert_close(out["iou"][:3], torch.tensor([0.5, 0.75, 0.0]))
    assert math.isnan(out["iou"][3]) and math.isnan(out["acc"][2]) and math.isnan(out["acc"][3])
    assert out["miou"] == pytest.approx(1.25 / 3) and out["macc"] == pytest.approx(0.75)
    assert out["pixel_acc"] == pytest.approx(5 / 7)
    assert out["miou"] == pytest.approx(mmseg_metrics(pred, target, 4)["miou"])


def test_metrics_match_mmseg_and_merge_like_ddp():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (4, 16, 16), generator=g)
    target[target == 5] = 255  # ignored pixels; class 5 never a target
    logits = torch.randn(4, 6, 16, 16, generator=g)
    whole, a, b = (SegmentationMetrics(num_classes=6) for _ in range(3))
    whole.update(logits, target)  # scores: argmax over the classes
    a.update(logits[:2].argmax(1), target[:2])
    b.update(logits[2:].argmax(1), target[2:])
    a.merge_state(b)  # what the DDP sync does: the states summed
    want = mmseg_metrics(logits.argmax(1), target, 6)
    for out in (whole.compute(), a.compute()):
        for key in ("miou", "macc", "pixel_acc"):
            assert out[key] == pytest.approx(want[key])
        torch.testing.assert_close(out["iou"].double(), want["iou"], equal_nan=True)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 6\)"):
        whole.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))


# ------------------------------------------------------------------------------------------------ weights
def test_load_backbone_from_a_classifier(tmp_path):
    for backbone in ("vittm_unequal", "vittm_equal"):
        classifier = create_model(**BACKBONES[backbone], num_classes=10)
        with torch.no_grad():
            for p in classifier.parameters():
                p.normal_()  # every tensor distinct from a fresh init
        path = tmp_path / f"{backbone}.pt"
        torch.save(classifier.state_dict(), path)
        net = make(backbone)
        report = net.load_backbone(path)
        assert "left out" in report and "not used for segmentation" in report
        theirs = classifier.state_dict()
        for key, value in net.backbone.state_dict().items():
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=0)
        assert not any(k.startswith(("head.", "process_head.")) for k in net.state_dict())


def test_load_backbone_timm_vit_resamples_its_position_table(tmp_path):
    classifier = create_model(**{**VIT, "img_size": 16}, num_classes=10)  # a 2x2 patch grid
    path = tmp_path / "vit.pt"
    torch.save({"state_dict": classifier.state_dict()}, path)
    net = make("vit")  # built at 32 px: 4x4
    report = net.load_backbone(path)
    assert "pos_embed resampled from 2x2 to 4x4" in report
    theirs = classifier.state_dict()
    for key, value in net.backbone.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=0)
    torch.testing.assert_close(net.backbone.pos_embed[:, :1], theirs["pos_embed"][:, :1])  # the class token's


def test_load_backbone_refuses_a_file_that_does_not_fit(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(create_model(name="vittm_test", embed_dim=48, num_heads=2).state_dict(), path)
    net = make()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match="finetune.from_ckpt"):
        net.load_backbone(path)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.skipif(not (AUTHORS / "lin_residual.pt").exists(), reason="the authors' fixtures are not here")
def test_load_backbone_from_the_authors_checkpoint():
    model = dict(name="vittm_test", embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0, img_size=64, memory_ps=8,
                 process_ps=16)
    net = SegmentationNet(model, SEGMENTER | {"n_heads": 3}, K)
    report = net.load_backbone(AUTHORS / "lin_residual.pt")
    assert "the authors'" in report
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, K, 64, 64)
