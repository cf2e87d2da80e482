"""Independent PyTorch references of the mitigation methods (CLVA, SEVI) on LLaVA-1.5.

They share no code with the export or the graph passes; `verify`, `eval --backend torch` and the tests
compare the exported graphs against them. See `llava_reference.py` for the model and the interpretations.
"""

from .clva import ClvaParams, ReferenceFlagError
from .llava_reference import FrozenAnchors, RefCache, ReferenceLlava, RefOutput
from .qwen2_vl_reference import ReferenceIavaQwen2VL, ReferenceQwen2VL
from .sevi import GLOBAL_TEXT_HEAD, LOCAL_TEXT_HEAD, NOT_CLASSIFIED, VISION_HEAD, SeviParams

__all__ = [
    "ClvaParams", "FrozenAnchors", "GLOBAL_TEXT_HEAD", "LOCAL_TEXT_HEAD", "NOT_CLASSIFIED", "RefCache", "RefOutput",
    "ReferenceFlagError", "ReferenceIavaQwen2VL", "ReferenceLlava", "ReferenceQwen2VL", "SeviParams", "VISION_HEAD",
]
