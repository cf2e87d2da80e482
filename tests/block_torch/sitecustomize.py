"""Put this folder first on PYTHONPATH to make torch and transformers unimportable in a subprocess.

A meta-path finder raises on any attempt, so a runtime that reaches for torch fails loudly, even through a
lazy or indirect import.
"""

import sys


class _BlockTorch:
    BLOCKED = ("torch", "transformers", "torchvision")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"blocked by the torch-free test: import of {name!r}")
        return None


sys.meta_path.insert(0, _BlockTorch())
