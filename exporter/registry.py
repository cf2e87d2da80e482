"""Architecture registry: one small module per architecture, registered by a decorator.

`exporter/archs/llava.py` does `@register_arch("LlavaForConditionalGeneration")`; the export path looks the
checkpoint's `architectures[0]` up here. Adding InstructBLIP or Qwen2-VL is one more module, no if/elif chain.
"""

from __future__ import annotations

from collections.abc import Callable

_ARCHS: dict[str, type] = {}


def register_arch(*names: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        for name in names:
            _ARCHS[name] = cls
        return cls

    return deco


def supported_architectures() -> list[str]:
    _import_builtin_archs()
    return sorted(_ARCHS)


def get_arch(name: str) -> type:
    _import_builtin_archs()
    return _ARCHS[name]


def _import_builtin_archs() -> None:
    # Imported lazily so that `import exporter` stays cheap; the modules register themselves.
    from exporter.archs import instructblip, llava  # noqa: F401
