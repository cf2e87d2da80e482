"""`anchorrt explain`: the CLVA paper's pictures (Figures 1-2) for one image and prompt, from the exported graphs.

numpy for the numbers (stats.py), matplotlib for the pictures (plots.py, the `profile` extra, imported only when
drawing), the runtime Pipeline for the forward pass (forward.py). No torch.
"""

from anchorrt.runtime.explain.report import FILES, explain

__all__ = ["FILES", "explain"]
