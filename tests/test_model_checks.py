"""Every key of every model and component config checked before anything is built (vittm.training.model_checks): a bad
value of each key is refused naming the full key, the shipped configs pass, no yaml key lacks a rule, and run.py stops
with one ``error:`` line before training."""

from __future__ import annotations

import inspect
import time

import pytest
from helpers import CONF, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer

from vittm.core.registry import REGISTRIES, knob_names
from vittm.models import ViTTM, is_vittm
from vittm.training.model_checks import BASELINE_KEYS, COMPONENT_KEYS, VITTM_KEYS, build_problem, model_config_problems
from vittm.training.validate import model_problems

COMPONENTS = ("rw_head", "fusion", "process_embed", "memory_block")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def yaml_keys() -> set[tuple[str, str]]:
    """(owner, key) for every key of the model and component yamls: owner ``vittm`` or ``baseline`` for a model key,
    ``<group>/<option>`` for a component's."""
    keys = set()
    for path in [*(CONF / "model").glob("*.yaml"), CONF / "model_common" / "vittm.yaml"]:
        node = OmegaConf.load(path)
        family = "vittm" if path.parent.name == "model_common" or is_vittm(node.name) else "baseline"
        keys |= {(family, k) for k in node if k != "defaults"}
    for group in COMPONENTS:
        for option in options(group):
            keys |= {(f"{group}/{option}", k) for k in OmegaConf.load(CONF / group / f"{option}.yaml")}
    return keys


@pytest.fixture(scope="module")
def cfg_of():
    """Compose the real config tree with overrides (one Hydra initialisation for the whole module)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda *overrides: compose(config_name="config", overrides=list(overrides))


# (owner, key) as in yaml_keys(), the overrides that set a bad value, and what the one line must contain.
VIT = ["model=vit_fmnist"]
BAD = [
    # ViTTM models (the default model, vittm_fmnist, and its model_common keys)
    ("vittm", "name", ["model.name=vittm_tinyy"], "model.name='vittm_tinyy': must be a ViTTM model ['vittm_base', "
     "'vittm_large', 'vittm_small', 'vittm_test', 'vittm_tiny'] or a timm baseline, e.g. vit_small_patch16_224, "
     "deit_small_patch16_224; did you mean 'vittm_tiny'?"),
    ("vittm", "num_classes", ["model.num_classes=0"], "model.num_classes=0: must be an integer >= 1"),
    ("vittm", "num_classes", ["data.num_classes=-1"], "model.num_classes=-1 (data.num_classes): must be an integer"),
    ("vittm", "in_chans", ["data.in_chans=0"], "model.in_chans=0 (data.in_chans): must be an integer >= 1"),
    ("vittm", "img_size", ["model.img_size=0"], "model.img_size=0: must be an integer >= 1"),
    ("vittm", "img_size", ["model.img_size=[28,28]"], "model.img_size=[28, 28]: must be an integer >= 1"),
    ("vittm", "img_size", ["model.img_size=24"], "model.img_size=24: not divisible by model.process_ps=7; both patch "
                                                 "sizes must divide it"),
    ("vittm", "memory_ps", ["model.memory_ps=0"], "model.memory_ps=0: must be an integer >= 1"),
    ("vittm", "memory_ps", ["model.memory_ps=5"], "model.img_size=28: not divisible by model.memory_ps=5"),
    ("vittm", "process_ps", ["model.process_ps=2.5"], "model.process_ps=2.5: must be an integer >= 1"),
    ("vittm", "process_tokens", ["model.process_tokens=0"], "model.process_tokens=0: must be an integer >= 1"),
    ("vittm", "process_tokens", ["model.process_tokens=9"],
     "model.process_tokens=9: the patch embedder makes (model.img_size / model.process_ps)^2 = 16 tokens"),
    ("vittm", "process_tokens", ["process_embed=downsample", "model.process_tokens=15"],
     "model.process_tokens=15: must be a perfect square for the downsample embedder"),
    ("vittm", "rw_head", ["model.rw_head=7"], "model.rw_head=7: must be a rw_head name ['ca', 'dyna'"),
    ("vittm", "read_head", ["model.read_head=cax"], "model.read_head='cax': must be one of ['ca', 'dyna', 'la', "
                                                    "'lca', 'lin', 'tl']; did you mean 'ca'?"),
    ("vittm", "write_head", ["model.write_head={name: lca, latent_size_scale: 0}"],
     "model.write_head.latent_size_scale=0: must be an integer >= 1"),
    ("vittm", "write_head", ["model.write_head={name: lca, latent_size_scale: 32}"],
     "model.write_head.latent_size_scale=32: the latent width model.embed_dim / latent_size_scale = 64/32 = 2 must be "
     "divisible by model.num_heads=4"),
    ("vittm", "fusion", ["model.fusion={kind: erase}"], "model.fusion={'kind': 'erase'}: must be a fusion name"),
    ("vittm", "process_embed", ["model.process_embed=[patch]"], "model.process_embed=['patch']: must be a "
                                                                "process_embed name"),
    ("vittm", "memory_block", ["model.memory_block=mpl"], "model.memory_block='mpl': must be one of ['conv', 'mlp', "
                                                          "'none']; did you mean 'mlp'?"),
    ("vittm", "eval_head", ["model.eval_head=proc"], "model.eval_head='proc': must be one of ['memory', 'process', "
                                                     "'mean']; did you mean 'process'?"),
    ("vittm", "drop_path_rate", ["model.drop_path_rate=1.0"], "model.drop_path_rate=1.0: must be a number in [0, 1)"),
    ("vittm", "embed_dim", ["model.embed_dim=0"], "model.embed_dim=0: must be an integer >= 1"),
    ("vittm", "depth", ["model.depth=0"], "model.depth=0: must be an integer >= 1"),
    ("vittm", "depth", ["model.depth=true"], "model.depth=True: must be an integer >= 1"),
    ("vittm", "num_heads", ["model.num_heads=0"], "model.num_heads=0: must be an integer >= 1"),
    ("vittm", "num_heads", ["model.num_heads=3"], "model.num_heads=3: must divide model.embed_dim=64"),
    ("vittm", "mlp_ratio", ["model.mlp_ratio=0"], "model.mlp_ratio=0: must be a number > 0"),
    ("vittm", "mlp_ratio", ["model.mlp_ratio=0.01"], "model.mlp_ratio=0.01: model.embed_dim=64 x mlp_ratio leaves "
                                                     "the MLP no hidden unit"),
    # ViTTM keys no yaml sets (a user adds them with +model.<key>=...)
    ("vittm", "qkv_bias", ["+model.qkv_bias=maybe"], "model.qkv_bias='maybe': must be true or false"),
    ("vittm", "drop_rate", ["+model.drop_rate=-0.1"], "model.drop_rate=-0.1: must be a number in [0, 1)"),
    ("vittm", "proj_drop_rate", ["+model.proj_drop_rate=1"], "model.proj_drop_rate=1: must be a number in [0, 1)"),
    ("vittm", "attn_drop_rate", ["+model.attn_drop_rate=nan"], "model.attn_drop_rate=nan: must be a number in [0, 1)"),
    ("vittm", "global_pool", ["+model.global_pool=max"], "model.global_pool='max': must be one of ['avg', '']"),
    ("vittm", "patch_size", ["+model.patch_size=16"], "model.patch_size=16: not an option of ViTTM models; its "
                                                      "options are ['attn_drop_rate'"),
    # components, as typed on the command line (group.key=...)
    ("rw_head/lin", "name", ["rw_head.name=lni"], "model.rw_head.name='lni' (rw_head.name): must be one of ['ca', "
                                                  "'dyna', 'la', 'lca', 'lin', 'tl']; did you mean 'lin'?"),
    ("rw_head/lin", "latent_size_scale", ["rw_head.latent_size_scale=0"],
     "model.rw_head.latent_size_scale=0 (rw_head.latent_size_scale): must be an integer >= 1"),
    ("rw_head/lin", "latent_size_scale", ["rw_head.latent_size_scale=3"],
     "model.rw_head.latent_size_scale=3 (rw_head.latent_size_scale): must divide model.embed_dim=64"),
    ("rw_head/lin", "eps", ["+rw_head.eps=0"], "model.rw_head.eps=0 (rw_head.eps): must be a number > 0"),
    ("rw_head/lin", "latent_size_scal", ["+rw_head.latent_size_scal=4"],
     "model.rw_head.latent_size_scal=4 (rw_head.latent_size_scal): not an option of rw_head 'lin'; its options are "
     "['eps', 'latent_size_scale', 'name']; did you mean 'latent_size_scale'?"),
    ("rw_head/ca", "name", ["rw_head=ca", "rw_head.name=CA"], "model.rw_head.name='CA' (rw_head.name): must be one"),
    ("rw_head/ca", "latent_size_scale", ["rw_head=ca", "+rw_head.latent_size_scale=4"],
     "model.rw_head.latent_size_scale=4 (rw_head.latent_size_scale): not an option of rw_head 'ca'"),
    ("rw_head/lca", "name", ["rw_head=lca", "rw_head.name=null"], "model.rw_head.name=None (rw_head.name): must be"),
    ("rw_head/lca", "latent_size_scale", ["rw_head=lca", "rw_head.latent_size_scale=-1"],
     "model.rw_head.latent_size_scale=-1 (rw_head.latent_size_scale): must be an integer >= 1"),
    ("rw_head/la", "name", ["rw_head=la", "rw_head.name=1"], "model.rw_head.name=1 (rw_head.name): must be one of"),
    ("rw_head/la", "latent_size_scale", ["rw_head=la", "rw_head.latent_size_scale=2.5"],
     "model.rw_head.latent_size_scale=2.5 (rw_head.latent_size_scale): must be an integer >= 1"),
    ("rw_head/la", "hidden_dim", ["rw_head=la", "rw_head.hidden_dim=0"],
     "model.rw_head.hidden_dim=0 (rw_head.hidden_dim): must be an integer >= 1"),
    ("rw_head/tl", "name", ["rw_head=tl", "rw_head.name=token_learner"], "model.rw_head.name='token_learner' "
                                                                         "(rw_head.name): must be one of"),
    ("rw_head/dyna", "name", ["rw_head=dyna", "rw_head.name=dynamixer"], "model.rw_head.name='dynamixer' "
                                                                         "(rw_head.name): must be one of"),
    ("rw_head/dyna", "reduced_dim", ["rw_head=dyna", "rw_head.reduced_dim=0"],
     "model.rw_head.reduced_dim=0 (rw_head.reduced_dim): must be an integer >= 1"),
    ("fusion/residual", "name", ["fusion.name=add"], "model.fusion.name='add' (fusion.name): must be one of "
                                                     "['add_erase', 'erase', 'residual']"),
    ("fusion/erase", "name", ["fusion=erase", "fusion.name=erasee"], "model.fusion.name='erasee' (fusion.name): "
                                                                     "must be one of"),
    ("fusion/add_erase", "name", ["fusion=add_erase", "fusion.name=add_erasee"],
     "did you mean 'add_erase'?"),
    ("fusion/add_erase", "gate", ["fusion=add_erase", "+fusion.gate=1"],
     "model.fusion.gate=1 (fusion.gate): not an option of fusion 'add_erase'; its options are ['name']"),
    ("process_embed/patch", "name", ["process_embed.name=patches"], "model.process_embed.name='patches' "
                                                                    "(process_embed.name): must be one of"),
    ("process_embed/patch", "process_tokens", ["+process_embed.process_tokens=15"],
     "model.process_embed.process_tokens=15 (process_embed.process_tokens): the patch embedder makes"),
    ("process_embed/downsample", "name", ["process_embed=downsample", "process_embed.name=pool"],
     "model.process_embed.name='pool' (process_embed.name): must be one of"),
    ("process_embed/downsample", "process_tokens", ["process_embed=downsample", "+process_embed.process_tokens=0"],
     "model.process_embed.process_tokens=0 (process_embed.process_tokens): must be an integer >= 1"),
    ("process_embed/latent", "name", ["process_embed=latent", "process_embed.name=learned"],
     "model.process_embed.name='learned' (process_embed.name): must be one of"),
    ("process_embed/latent", "process_tokens", ["process_embed=latent", "+process_embed.process_tokens=9",
                                                "model.process_tokens=16"],
     "model.process_tokens=16: disagrees with model.process_embed.process_tokens=9; set one of them"),
    ("memory_block/none", "name", ["memory_block.name=identity"], "model.memory_block.name='identity' "
                                                                  "(memory_block.name): must be one of"),
    ("memory_block/mlp", "name", ["memory_block=mlp", "memory_block.name=MLP"], "model.memory_block.name='MLP' "
                                                                                "(memory_block.name): must be one of"),
    ("memory_block/mlp", "memory_mlp_ratio", ["memory_block=mlp", "memory_block.memory_mlp_ratio=0"],
     "model.memory_block.memory_mlp_ratio=0 (memory_block.memory_mlp_ratio): must be a number > 0"),
    ("memory_block/mlp", "memory_mlp_ratio", ["memory_block=mlp", "memory_block.memory_mlp_ratio=0.01"],
     "model.memory_block.memory_mlp_ratio=0.01 (memory_block.memory_mlp_ratio): model.embed_dim=64 x "
     "memory_mlp_ratio leaves the memory MLP no hidden unit"),
    ("memory_block/conv", "name", ["memory_block=conv", "memory_block.name=cnn"], "model.memory_block.name='cnn' "
                                                                                  "(memory_block.name): must be one"),
    ("memory_block/conv", "depth", ["memory_block=conv", "memory_block.depth=0"],
     "model.memory_block.depth=0 (memory_block.depth): must be an integer >= 1"),
    ("memory_block/conv", "kernel_size", ["memory_block=conv", "memory_block.kernel_size=4"],
     "model.memory_block.kernel_size=4 (memory_block.kernel_size): must be an odd integer >= 1"),
    # timm baselines (vit_fmnist sets every key a baseline yaml has)
    ("baseline", "name", [*VIT, "model.name=vit_tiny_patch16_2244"], "did you mean 'vit_tiny_patch16_224'?"),
    ("baseline", "num_classes", [*VIT, "data.num_classes=0"], "model.num_classes=0 (data.num_classes): must be an "
                                                              "integer >= 1"),
    ("baseline", "in_chans", [*VIT, "data.in_chans=-3"], "model.in_chans=-3 (data.in_chans): must be an integer >= 1"),
    ("baseline", "img_size", [*VIT, "model.img_size=0"], "model.img_size=0: must be an integer >= 1"),
    ("baseline", "img_size", [*VIT, "model.img_size=30"], "model.img_size=30: not divisible by model.patch_size=4"),
    ("baseline", "patch_size", [*VIT, "model.patch_size=0"], "model.patch_size=0: must be an integer >= 1"),
    ("baseline", "embed_dim", [*VIT, "model.embed_dim=0"], "model.embed_dim=0: must be an integer >= 1"),
    ("baseline", "depth", [*VIT, "model.depth=-1"], "model.depth=-1: must be an integer >= 1"),
    ("baseline", "num_heads", [*VIT, "model.num_heads=0"], "model.num_heads=0: must be an integer >= 1"),
    ("baseline", "num_heads", ["model=vit_tiny", "+model.num_heads=5"], "model.num_heads=5: must divide "
                                                                        "model.embed_dim=192"),
    ("baseline", "mlp_ratio", [*VIT, "model.mlp_ratio=-2"], "model.mlp_ratio=-2: must be a number > 0"),
    ("baseline", "drop_path_rate", [*VIT, "model.drop_path_rate=1.5"], "model.drop_path_rate=1.5: must be a number "
                                                                       "in [0, 1)"),
    ("baseline", "memory_ps", [*VIT, "+model.memory_ps=4"], "model.memory_ps=4: a ViTTM option; "
                                                            "model.name='vit_tiny_patch16_224' is a timm baseline"),
    ("baseline", "class_token", ["model=deit_tiny", "+model.class_token=false"],
     "model.class_token=False: token pooling (model.global_pool='token') needs model.class_token=true"),
    ("baseline", "init_values", [*VIT, "+model.init_values=0"], "model.init_values=0: must be a number > 0"),
    ("baseline", "reg_tokens", [*VIT, "+model.reg_tokens=-1"], "model.reg_tokens=-1: must be an integer >= 0"),
    ("baseline", "pos_embed", [*VIT, "+model.pos_embed=sincos"], "model.pos_embed='sincos': must be one of"),
    ("baseline", "weight_init", [*VIT, "+model.weight_init=jax_nlbh"], "did you mean 'jax_nlhb'?"),
    ("baseline", "scale_attn_norm", [*VIT, "+model.scale_attn_norm=true"], "model.scale_attn_norm=True: must be false"),
    ("baseline", "patch_drop_rate", [*VIT, "+model.patch_drop_rate=1"], "model.patch_drop_rate=1: must be a number"),
    ("baseline", "qkv_bias", [*VIT, "+model.qkv_bias=1"], "model.qkv_bias=1: must be true or false"),
    ("baseline", "global_pool", [*VIT, "+model.global_pool=mean"], "model.global_pool='mean': must be one of"),
]


@pytest.mark.parametrize(("owner", "key", "overrides", "expected"), BAD,
                         ids=[f"{o}.{k}:{v[-1]}" for o, k, v, _ in BAD])
def test_a_bad_value_of_each_key_is_refused_naming_it(cfg_of, owner, key, overrides, expected):
    lines = model_problems(cfg_of(*overrides))
    assert any(expected in line for line in lines), lines
    assert len(lines) == 1 and lines[0].startswith("model."), lines  # one line, named from the top


def test_every_yaml_key_has_a_bad_value_case():
    assert yaml_keys() <= {(owner, key) for owner, key, _, _ in BAD}


@pytest.mark.parametrize("model", options("model"))
def test_shipped_configs_pass(cfg_of, model):
    cfg = cfg_of(f"model={model}")
    assert model_problems(cfg) == []  # the table, then the meta-device build
    if not is_vittm(cfg.model.name):
        return  # a baseline takes no components
    # every option of every component group with this model, the groups' options side by side (6 compositions)
    groups = [[f"{group}={option}" for option in options(group)] for group in COMPONENTS]
    for row in range(max(map(len, groups))):
        overrides = [opts[row] for opts in groups if row < len(opts)]
        assert model_config_problems(cfg_of(f"model={model}", *overrides).model) == [], overrides


@pytest.mark.parametrize("experiment", options("experiment"))
def test_shipped_experiments_pass(cfg_of, experiment):
    assert model_config_problems(cfg_of(f"experiment={experiment}").model) == []


def test_every_yaml_key_has_a_rule():
    for owner, key in yaml_keys():
        if key == "name":  # checked first, for every model and component
            continue
        if owner in ("vittm", "baseline"):
            assert key in (VITTM_KEYS if owner == "vittm" else BASELINE_KEYS), (owner, key)
        else:
            group, option = owner.split("/")
            assert key in COMPONENT_KEYS[group][option], (owner, key)


def test_every_constructor_keyword_has_a_rule():
    """Not only the yaml keys: whatever a config can reach (``+model.x=``) is in the tables, and nothing more."""
    assert set(inspect.signature(ViTTM).parameters) - {"device", "dtype"} == set(VITTM_KEYS)
    layers = {"embed_layer", "embed_norm_layer", "norm_layer", "act_layer", "block_fn", "mlp_layer", "attn_layer",
              "device", "dtype"}  # classes, not config values
    assert set(inspect.signature(VisionTransformer).parameters) - layers == set(BASELINE_KEYS)
    for family, registry in REGISTRIES.items():
        assert set(COMPONENT_KEYS[family]) == set(registry.names()), family
        for name in registry.names():
            assert set(knob_names(registry.get(name))) == set(COMPONENT_KEYS[family][name]), (family, name)


def test_plain_mapping_with_sources():
    cfg = {"name": "vittm_test", "rw_head": {"name": "lin", "latent_size_scale": 0}, "eval_head": "both"}
    assert model_config_problems(cfg, sources={"rw_head": "rw_head"}) == [
        "model.rw_head.latent_size_scale=0 (rw_head.latent_size_scale): must be an integer >= 1 (the latent width is "
        "embed_dim / latent_size_scale)",
        "model.eval_head='both': must be one of ['memory', 'process', 'mean']",
    ]
    assert model_config_problems({"name": "vittm_test", "drop_path_rate": None}) == []  # null: not set


def test_build_errors_name_the_key_they_mention():
    args = {"name": "vittm_test", "embed_dim": 30, "rw_head": {"name": "lin", "latent_size_scale": 4}}
    assert build_problem("rw_head 'lin': latent_size_scale=4 must divide D=30", args, {"rw_head": "rw_head"}) == (
        "model.rw_head.latent_size_scale=4 (rw_head.latent_size_scale): rw_head 'lin': latent_size_scale=4 must "
        "divide D=30"
    )
    assert build_problem("something else", args) == "model: something else (model.name='vittm_test')"


def test_cli_stops_before_training_with_one_error_line(tmp_path):
    start = time.perf_counter()
    proc = run_cli(tmp_path, "rw_head.latent_size_scale=0", f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: model.rw_head.latent_size_scale=0 (rw_head.latent_size_scale): must be an integer >= 1 "
                      "(the latent width is embed_dim / latent_size_scale)"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.json").exists()
    assert time.perf_counter() - start < 120  # imports and composition only: no data read, nothing trained
