"""ViTTM models. Importing this package registers the components and the timm entrypoints."""

from vittm.models import embed, fusion, memory, rw_heads  # noqa: F401  (registration side effects)
from vittm.models.entrypoints import SIZES
from vittm.models.factory import VITTM_ONLY_ARGS, create_model, forward_heads, is_vittm
from vittm.models.from_vit import convert_vit_state_dict
from vittm.models.loading import WeightsError, WeightsReport, load_weights, read_state_dict
from vittm.models.vittm import DEFAULT_RW_HEAD, EVAL_HEADS, ViTTM, ViTTMLayer

__all__ = [
    "DEFAULT_RW_HEAD", "EVAL_HEADS", "SIZES", "VITTM_ONLY_ARGS", "ViTTM", "ViTTMLayer", "WeightsError",
    "WeightsReport", "convert_vit_state_dict", "create_model", "forward_heads", "is_vittm", "load_weights",
    "read_state_dict",
]
