"""vittm: Vision Token Turing Machines (Jajal et al., WACV 2025) as timm models plus a Hydra/Lightning framework.

``import vittm`` registers ``vittm_{test,tiny,small,base,large}`` with timm, so ``timm.create_model`` builds them.
``vittm.load_weights(model, path)`` loads any weight file we know (ours, the authors', a timm ViT) exactly.
"""

from vittm import models  # noqa: F401  (registers the timm entrypoints)
from vittm.core.registry import FUSIONS, MEMORY_BLOCKS, PROCESS_EMBEDS, REGISTRIES, RW_HEADS, Registry
from vittm.models import ViTTM, load_weights
from vittm.studies import sweep  # noqa: F401  (registers the config resolvers)

load_vit_checkpoint = load_weights  # its former name, from when only timm ViT files were read

__version__ = "0.1.0"
__all__ = [
    "FUSIONS", "MEMORY_BLOCKS", "PROCESS_EMBEDS", "REGISTRIES", "RW_HEADS", "Registry", "ViTTM", "load_vit_checkpoint",
    "load_weights",
]
