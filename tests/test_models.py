"""The ViTTM model family, generated from the registries: every option of every family on vittm_test,
every size built, the published parameter/MAC figures, and clear errors for bad input."""

from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

import vittm  # noqa: F401  (registers the models)
from vittm.core.registry import FUSIONS, MEMORY_BLOCKS, PROCESS_EMBEDS, RW_HEADS
from vittm.models import ViTTM, create_model, forward_heads
from vittm.models.flops import count_macs, count_params

HEADS, FUSES, EMBEDS, MEMS = RW_HEADS.names(), FUSIONS.names(), PROCESS_EMBEDS.names(), MEMORY_BLOCKS.names()
SIZE_BOUND = {"tl", "dyna", "add_erase"}  # their weights depend on the token counts


def covering_combos() -> list[dict]:
    """12 combinations touching every option of every family at least twice; half have read != write."""
    combos = []
    for i in range(12):
        read = HEADS[i % len(HEADS)]
        write = read if i < 6 else HEADS[(i + 2) % len(HEADS)]
        combos.append(dict(
            read_head=read, write_head=write, fusion=FUSES[i % len(FUSES)],
            process_embed=EMBEDS[(i // 3) % len(EMBEDS)], memory_block=MEMS[(i // 2) % len(MEMS)],
        ))
    return combos


COMBOS = covering_combos()


def combo_id(c: dict) -> str:
    return f"{c['read_head']}-{c['write_head']}-{c['fusion']}-{c['process_embed']}-{c['memory_block']}"


def size_bound(c: dict) -> bool:
    return bool(SIZE_BOUND & {c["read_head"], c["write_head"], c["fusion"]})


def tiny(**kwargs) -> ViTTM:
    return timm.create_model("vittm_test", num_classes=5, **kwargs)


def randomize_heads(model: ViTTM) -> None:
    """Heads start at zero (SPEC §3), which blocks every gradient behind them; give them values for grad tests."""
    for head in (model.head, model.process_head):
        nn.init.normal_(head.weight, std=0.02)


def test_combos_cover_every_option_twice():
    counts = Counter()
    for c in COMBOS:
        counts.update([("rw", c["read_head"]), ("rw", c["write_head"]), ("fusion", c["fusion"]),
                       ("embed", c["process_embed"]), ("mem", c["memory_block"])])
    families = {"rw": HEADS, "fusion": FUSES, "embed": EMBEDS, "mem": MEMS}
    assert all(counts[(fam, o)] >= 2 for fam, opts in families.items() for o in opts), counts
    assert sum(c["read_head"] != c["write_head"] for c in COMBOS) >= 6


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_forward_shapes_and_every_parameter_learns(combo):
    model = tiny(**combo).train()
    randomize_heads(model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    memory, process = model.forward_both(x)
    assert memory.shape == process.shape == (2, 5)
    assert torch.isfinite(memory).all() and torch.isfinite(process).all()
    (F.cross_entropy(memory, y) + F.cross_entropy(process, y)).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_state_dict_round_trip(combo):
    model = tiny(**combo).eval()
    randomize_heads(model)
    torch.manual_seed(123)
    other = tiny(**combo).eval()
    other.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(other.forward_both(x), model.forward_both(x), rtol=0, atol=0)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_two_input_sizes(combo):
    if size_bound(combo):  # built per size: each works at its own size, and refuses another one clearly
        for size in (32, 48):
            out = tiny(img_size=size, **combo)(torch.randn(2, 3, size, size))
            assert out.shape == (2, 5) and torch.isfinite(out).all()
        with pytest.raises(ValueError, match="input size 48x48 differs from img_size=32x32, and this model uses"):
            tiny(**combo)(torch.randn(1, 3, 48, 48))
    else:  # one model, position tables resampled for the other size
        model = tiny(**combo)
        for size in (32, 48):
            out = model(torch.randn(2, 3, size, size))
            assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_list_models():
    assert timm.list_models("vittm*") == ["vittm_base", "vittm_large", "vittm_small", "vittm_test", "vittm_tiny"]


@pytest.mark.parametrize("name", timm.list_models("vittm*"))
def test_every_size_builds(name):
    small = name in ("vittm_test", "vittm_tiny")
    with torch.device("cpu" if small else "meta"):  # big ones only built, on the meta device
        model = timm.create_model(name)
    size = model.img_size[0]
    out = model(torch.randn(1, 3, size, size, device="cpu" if small else "meta"))
    assert out.shape == (1, 1000)
    if small:
        assert torch.isfinite(out).all()


def test_published_base_parameters_and_macs():
    with torch.device("meta"):
        base = timm.create_model("vittm_base")  # 28/28, lin, latent_size_scale 4
        paper_text = timm.create_model("vittm_base", memory_ps=16, process_ps=32)
        vit = timm.create_model("vit_base_patch16_224")
    assert round(count_params(base) / 1e6, 1) == 111.6
    assert round(count_params(paper_text) / 1e6, 1) == 111.0
    # SPEC §8 figures use fvcore's convention (LayerNorms included); plain matmul MACs are ~0.02 G lower.
    assert count_macs(vit, count_norms=True) / 1e9 == pytest.approx(17.58, abs=0.01)
    assert count_macs(base, count_norms=True) / 1e9 == pytest.approx(7.16, abs=0.01)
    assert count_macs(paper_text, count_norms=True) / 1e9 == pytest.approx(7.14, abs=0.01)
    assert count_macs(base) / 1e9 == pytest.approx(7.16, rel=0.01)
    assert count_macs(vit) / count_macs(base) == pytest.approx(2.46, abs=0.01)


OPTIONS = [("rw_head", o) for o in HEADS] + [("fusion", o) for o in FUSES] + [
    ("process_embed", o) for o in EMBEDS] + [("memory_block", o) for o in MEMS]


@pytest.mark.parametrize(("key", "option"), OPTIONS, ids=[f"{k}={o}" for k, o in OPTIONS])
@pytest.mark.parametrize("patches", [(28, 28), (16, 32)], ids=["28-28", "16-32"])
def test_every_spec_option_builds_at_base_size(key, option, patches):
    with torch.device("meta"):
        model = timm.create_model("vittm_base", memory_ps=patches[0], process_ps=patches[1], **{key: option})
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


def test_lin_matches_explicit_quadratic_form():
    head = RW_HEADS.build({"name": "lin", "latent_size_scale": 2}, dim=32, num_heads=4)
    src, dst = torch.randn(2, 10, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        fast = head(src, dst)
        q = F.elu(head.q(dst)) + 1  # (B, M, c)
        k, v = head.kv(src).split([16, 32], dim=-1)
        k = F.elu(k) + 1
        naive = torch.empty_like(fast)
        for h in range(4):
            qh, kh, vh = q[..., 4 * h:4 * h + 4], k[..., 4 * h:4 * h + 4], v[..., 8 * h:8 * h + 8]
            scores = qh @ kh.transpose(1, 2)  # (B, M, N): the (q·kᵀ) form, no softmax
            naive[..., 8 * h:8 * h + 8] = (scores @ vh) / (scores.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)


def test_ca_matches_explicit_softmax_attention():
    head = RW_HEADS.build("ca", dim=32, num_heads=4)
    src, dst = torch.randn(2, 10, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        k, v = head.kv(src).chunk(2, dim=-1)
        q, k, v = head.q_norm(head.q(dst)), head.k_norm(k), head.v_norm(v)
        outs = []
        for h in range(4):
            sl = slice(8 * h, 8 * h + 8)
            attn = (q[..., sl] @ k[..., sl].transpose(1, 2) / 8**0.5).softmax(-1)
            outs.append(attn @ v[..., sl])
        torch.testing.assert_close(head(src, dst), head.proj(torch.cat(outs, -1)), rtol=1e-5, atol=1e-5)


BAD_INPUTS = [
    (dict(rw_head="lni"), r"rw_head='lni' is not a known rw_head; choose one of \['ca', .*did you mean 'lin'"),
    (dict(read_head="xx"), r"read_head='xx' is not a known rw_head"),
    (dict(fusion="residul"), r"fusion='residul' is not a known fusion.*did you mean 'residual'"),
    (dict(process_embed="lattent"), r"process_embed='lattent' is not a known process_embed"),
    (dict(memory_block="convv"), r"memory_block='convv' is not a known memory_block"),
    (dict(rw_head={"name": "lin", "scale": 4}), r"'lin' has no option \['scale'\]; its options are"),
    (dict(img_size=30), r"img_size=30x30 is not divisible by memory_ps=4"),
    (dict(process_ps=12), r"img_size=32x32 is not divisible by process_ps=12"),
    (dict(rw_head={"name": "lin", "latent_size_scale": 3}),
     r"latent_size_scale=3 must be a positive integer dividing D=32"),
    (dict(rw_head={"name": "lca", "latent_size_scale": 32}),
     r"c = D/latent_size_scale = 32/32 = 1 must be divisible by num_heads=2"),
    (dict(num_heads=3), r"embed_dim=32 must be divisible by num_heads=3"),
    (dict(process_embed="downsample", process_tokens=10), r"process_tokens=10 must be a perfect square"),
    (dict(process_embed="patch", process_tokens=10), r"process_tokens=10 disagrees with img_size"),
    (dict(eval_head="both"), r"eval_head='both' is not allowed; choose one of \['memory', 'process', 'mean'\]"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS, ids=[str(k) for k, _ in BAD_INPUTS])
def test_bad_input_raises_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_input_size_checked_at_forward():
    with pytest.raises(ValueError, match="input size 30x30 is not divisible by memory_ps=4"):
        tiny()(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"differs from img_size=32x32, and this model uses \['add_erase', 'tl'\]"):
        tiny(rw_head="tl", fusion="add_erase")(torch.randn(1, 3, 48, 48))
    # the components check too when used on their own
    with pytest.raises(ValueError, match="'tl' was built for 64 source and 16 destination tokens but got 144"):
        RW_HEADS.build("tl", dim=32, num_src=64, num_dst=16)(torch.randn(1, 144, 32), torch.randn(1, 36, 32))
    with pytest.raises(ValueError, match="'add_erase' was built for 16 target tokens but got 36"):
        FUSIONS.build("add_erase", dim=32, num_tokens=16)(torch.randn(1, 36, 32), torch.randn(1, 36, 32))


def test_eval_heads_and_skipped_last_write():
    model = tiny(memory_block="mlp").eval()
    randomize_heads(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        memory, process = model.forward_both(x)
        torch.testing.assert_close(model(x), memory)
        model.eval_head = "process"  # skips the last write and memory block: same process logits
        torch.testing.assert_close(model(x), process)
        model.eval_head = "mean"
        torch.testing.assert_close(model(x), (memory + process) / 2)
    with pytest.raises(ValueError, match="eval_head='all'"):
        model.eval_head = "all"


def test_timm_model_api():
    model = tiny(drop_path_rate=0.1)
    assert model.pretrained_cfg["architecture"] == "vittm_test"
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() and model.no_weight_decay() <= names.keys()
    assert tiny(process_embed="latent").no_weight_decay() >= {"process_embed.tokens"}
    rates = [getattr(layer.block.drop_path1, "drop_prob", 0.0) for layer in model.layers]  # rate 0: Identity
    assert rates == pytest.approx([0.0, 0.1])
    memory, process = model.forward_features(torch.randn(2, 3, 32, 32))
    assert memory.shape == (2, 64, 32) and process.shape == (2, 16, 32)
    assert model.get_classifier() is model.head
    model.reset_classifier(7)
    assert model.head.out_features == model.process_head.out_features == 7
    assert not model.head.weight.any() and not model.process_head.weight.any()
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)  # pooled features, as timm does
    # timm's optimizer factory understands the parameter groups (weight decay + layer decay)
    opt = create_optimizer_v2(tiny(), "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert len(opt.param_groups) > 2


def test_gradient_checkpointing_gives_the_same_gradients():
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 4])
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = tiny(memory_block="conv")
        randomize_heads(model)
        model.set_grad_checkpointing(enable)
        memory, process = model.forward_both(x)
        (F.cross_entropy(memory, y) + F.cross_entropy(process, y)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_latent_tokens_need_not_be_square():
    model = tiny(process_embed="latent", process_tokens=10)
    assert model.forward_features(torch.randn(1, 3, 32, 32))[1].shape == (1, 10, 32)


def test_process_tokens_as_knob_or_argument():
    assert tiny(process_embed={"name": "downsample", "process_tokens": 4}).process_grid == (2, 2)
    assert tiny(process_embed="downsample", process_tokens=4).process_grid == (2, 2)
    with pytest.raises(ValueError, match="process_tokens=9 disagrees with process_embed.process_tokens=4"):
        tiny(process_embed={"name": "downsample", "process_tokens": 4}, process_tokens=9)


def test_baselines_go_through_the_same_factory():
    vit = create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, memory_block=None)
    assert set(forward_heads(vit, torch.randn(2, 3, 32, 32))) == {"logits"}
    assert set(forward_heads(create_model("vittm_test", num_classes=10), torch.randn(2, 3, 32, 32))) == {
        "memory", "process"}
    with torch.device("meta"):
        assert count_params(create_model("deit_small_patch16_224")) == pytest.approx(22.05e6, rel=0.01)
        assert count_params(create_model("vit_base_patch16_224")) == pytest.approx(86.57e6, rel=0.001)
    with pytest.raises(ValueError, match=r"\['memory_ps', 'rw_head'\] are ViTTM options"):
        create_model("vit_base_patch16_224", rw_head="lin", memory_ps=16)
    with pytest.raises(ValueError, match="model='vit_bse_patch16_224' is not a registered timm model"):
        create_model("vit_bse_patch16_224")


@pytest.mark.parametrize(("family", "name"), [(f, n) for f, reg in
                                              (("rw_head", RW_HEADS), ("fusion", FUSIONS),
                                               ("process_embed", PROCESS_EMBEDS), ("memory_block", MEMORY_BLOCKS))
                                              for n in reg.names()])
def test_macs_count_for_every_option(family, name):
    """metrics.json and the benchmark count MACs for any model a sweep builds (a latent embedder once broke it)."""
    model = create_model("vittm_test", **{family: name})
    assert count_macs(model, (3, 32, 32)) > 0
