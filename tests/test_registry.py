"""The generic Registry: registration, lookup errors, and the three spec forms of build()."""

import pytest
from torch import nn

from vittm.core.registry import REGISTRIES, Registry, knob_names


@pytest.fixture
def reg():
    reg = Registry("widget")

    @reg.register("alpha")
    class Alpha(nn.Module):
        def __init__(self, dim: int, scale: int = 2) -> None:
            super().__init__()
            self.dim, self.scale = dim, scale

    @reg.register("beta")
    class Beta(nn.Module):
        def __init__(self) -> None:
            super().__init__()

    return reg


def test_register_and_names(reg):
    assert reg.names() == ["alpha", "beta"]
    assert "alpha" in reg and "gamma" not in reg
    assert reg.get("alpha").registry_name == "alpha"


def test_duplicate_name_raises(reg):
    with pytest.raises(ValueError, match="'alpha' is already registered"):

        @reg.register("alpha")
        class Again(nn.Module):
            pass


def test_unknown_name_lists_known_and_closest(reg):
    with pytest.raises(ValueError) as err:
        reg.build("alpah", dim=4)
    msg = str(err.value)
    assert "widget='alpah'" in msg and "['alpha', 'beta']" in msg and "did you mean 'alpha'" in msg


def test_error_names_the_argument_given(reg):
    with pytest.raises(ValueError, match="read_head='zzz'"):
        reg.build("zzz", arg="read_head")


def test_build_from_name_dict_and_class(reg):
    by_name = reg.build("alpha", dim=8, unused_dim=1)  # dims a class does not take are dropped
    assert (by_name.dim, by_name.scale) == (8, 2)
    by_dict = reg.build({"name": "alpha", "scale": 3}, dim=8)
    assert (by_dict.dim, by_dict.scale) == (8, 3)
    by_class = reg.build(reg.get("beta"), dim=8)
    assert type(by_class).__name__ == "Beta"


def test_dict_spec_errors(reg):
    with pytest.raises(ValueError, match="needs a 'name' key"):
        reg.build({"scale": 3}, dim=8)
    with pytest.raises(ValueError, match=r"'alpha' has no option \['sclae'\]; its options are \['scale'\]"):
        reg.build({"name": "alpha", "sclae": 3}, dim=8)
    with pytest.raises(TypeError, match="must be a name, a dict"):
        reg.build(3, dim=8)


def test_model_dims_are_not_knobs(reg):
    assert knob_names(reg.get("alpha")) == ["scale"]
    with pytest.raises(ValueError, match="has no option"):
        reg.build({"name": "alpha", "dim": 3}, dim=8)  # the model owns dim; a config may not set it


def test_project_families():
    import vittm  # noqa: F401  (registers everything)

    assert {k: r.names() for k, r in REGISTRIES.items()} == {
        "rw_head": ["ca", "dyna", "la", "lca", "lin", "tl"],
        "fusion": ["add_erase", "erase", "residual"],
        "process_embed": ["downsample", "latent", "patch"],
        "memory_block": ["conv", "mlp", "none"],
    }
