"""pytest plugin: run timm's own ``tests/test_models.py`` (unmodified) on the ``vittm_*`` entrypoints only.

timm picks the tests a model gets by its name and its module (e.g. ``vit_*`` for the non-standard config test,
module ``vision_transformer`` for the ``forward_intermediates`` tests). Our models live in another package under
other names, so this plugin wraps ``timm.list_models`` before the test module is imported: every listing holds the
``vittm_*`` models exactly when the same listing would hold timm's ViT-B/16 (``vit_base_patch16_224``), and no
other model. A ViTTM is thus tested wherever timm tests its ViT. ``-k vittm`` then leaves out the few tests that
name timm models directly. Listings of pretrained models stay without ours: no ViTTM weights are hosted.
"""

from __future__ import annotations

import timm

import vittm  # noqa: F401  (registers the vittm_* entrypoints)

REPRESENTATIVE = "vit_base_patch16_224"
_original = timm.list_models


def list_models(*args, **kwargs):
    if kwargs.get("pretrained") or (len(args) > 2 and args[2]):
        return []
    listed = {name.split(".")[0] for name in _original(*args, **kwargs)}  # include_tags=True adds ".tag"
    return _original("vittm_*", include_tags=kwargs.get("include_tags")) if REPRESENTATIVE in listed else []


timm.list_models = list_models


def pytest_configure(config):
    # timm bounds its CI runners' time with pytest-timeout marks; here they are not enforced (the speed of a shared
    # 2-core machine is not what the suite tests), only declared so that pytest does not warn about them
    config.addinivalue_line("markers", "timeout(seconds): pytest-timeout's limit in timm's CI (not enforced here)")
