"""Architecture registry: one small module per architecture, registered by a decorator.

`exporter/archs/llava.py` does `@register_arch("LlavaForConditionalGeneration")`; the export path looks the
checkpoint's `architectures[0]` up here. Adding InstructBLIP or Qwen2-VL is one more module, no if/elif chain.

Pre-load check (issue 13): an arch class may define

    @classmethod
    def check_config(cls, config: dict, preprocessor: dict | None) -> dict

which gets config.json and the raw image-processor config (exporter/preprocessing.py `image_processor_config`;
None when the folder has none) as plain dicts, raises a one-line CheckpointError for anything it cannot export
(options, image processor, unsupported sub-models), and returns facts the generic checks use, today
{"num_layers": decoder layer count} (the mitigation layer choices are checked against it). `check_config` below runs
it before a single weight is read, so every refusal that config files can decide comes in well under a second.
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


_REFUSALS: dict[str, str] = {}


def register_refusal(message: str, *names: str) -> None:
    """Architectures we recognise and refuse with a specific one-line reason (e.g. remote-code-only checkpoints)."""
    for name in names:
        _REFUSALS[name] = message


def refusal_for(name: str) -> str | None:
    _import_builtin_archs()
    return _REFUSALS.get(name)


def supported_architectures() -> list[str]:
    _import_builtin_archs()
    return sorted(_ARCHS)


def get_arch(name: str) -> type:
    _import_builtin_archs()
    return _ARCHS[name]


def check_config(architecture: str, config: dict, folder) -> dict:
    """Run the arch's `check_config` hook (if it has one) on the checkpoint folder's config files, before any weight
    loads. -> facts such as {"num_layers": 32}; {} when the arch has no hook (its checks then come at load, and
    nothing is read here: an arch that keeps its processor config elsewhere is not refused by a generic reader)."""
    cls = get_arch(architecture)
    hook = getattr(cls, "check_config", None)
    if hook is None:
        return {}
    from anchorrt.exporter.preprocessing import image_processor_config

    preprocessor, _ = image_processor_config(folder)
    return dict(hook(config, preprocessor) or {})


def _import_builtin_archs() -> None:
    # Imported lazily so that `import exporter` stays cheap; the modules register themselves.
    from anchorrt.exporter.archs import llava, llava_next, qwen2_vl  # noqa: F401
