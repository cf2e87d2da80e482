"""What every `anchorrt` command module shares: user errors as one line, and progress on stderr.

Kept apart from `anchorrt.cli` so that command modules (`cli_eval`, `cli_profile`, `cli_visalign`) import it
directly; `anchorrt.cli` imports them to register their commands.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading

import click

from anchorrt.runtime.errors import AnchorError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `except BaseException: remove the temporary folder` runs."""


def _on_sigterm(signum, frame):
    raise Terminated


def friendly(fn):
    """AnchorError → `error: <one line>` and its exit code; Ctrl-C → exit 130, SIGTERM → exit 143 (both after the
    temporary outputs are removed); a missing optional dependency → the install command. Never a traceback for a
    problem the user can fix."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except AnchorError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(143 if isinstance(exc, Terminated) else 130)
        except ModuleNotFoundError as exc:  # a missing package; a bad name inside one of ours stays a traceback (a bug)
            click.echo(f"error: {exc.name or exc} is not installed; {install_hint(exc.name)}", err=True)
            sys.exit(2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


# A missing top-level module -> the pyproject extra that installs it. `bake` is torch-free: its modules map to
# [bake], never to [export] (issue 13: a [bake,cpu] install was told to install [export]).
EXTRA_OF = {
    "torch": "export", "transformers": "export", "onnxscript": "export", "torchvision": "export",
    "onnx": "bake", "onnx_ir": "bake", "safetensors": "bake", "ml_dtypes": "bake",
    "onnxruntime": "cpu", "matplotlib": "profile", "tensorrt": "trt",
}


def install_hint(module: str | None) -> str:
    top = (module or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra == "cpu":
        return "install onnxruntime: `pip install anchorrt[cpu]` (or anchorrt[gpu] for CUDA)"
    if extra:
        return f"this command needs `pip install anchorrt[{extra}]`"
    return f"install it: `pip install {top or module}`"


def say(msg: str) -> None:
    click.echo(msg, err=True)
