"""A `tritonclient` client for a served artifact: an image, a prompt, sampling options and mitigation flags.

    from anchorrt.runtime.serving.client import AnchorClient
    client = AnchorClient("127.0.0.1:8000")                              # HTTP; protocol="grpc" for port 8001
    out = client.generate("cat.jpg", "Is there a dog?", mitigation={"clva": {"alpha": 14}, "sevi": True},
                          max_new_tokens=32)
    print(out.text, out.token_ids, out.finish_reason)
    for piece in AnchorClient("127.0.0.1:8001", protocol="grpc").stream("cat.jpg", "Describe it."):
        print(piece.text, end="")                                         # decoupled model, one token at a time

Tensors and parameters are those of runtime/serving/model.py and params.py: IMAGE (encoded bytes) and PROMPT as
BYTES [1, 1]; flags as request parameters (tritonclient's `infer(..., parameters=...)`). Streaming uses the gRPC
bidirectional stream (`start_stream` / `async_stream_infer`), the only way to read a decoupled model's responses
(https://github.com/triton-inference-server/server/blob/main/docs/user_guide/decoupled_models.md).
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from anchorrt.runtime.errors import AnchorError, BackendError
from anchorrt.runtime.serving.params import to_parameters
from anchorrt.runtime.serving.repository import MODEL_NAME, STREAM_SUFFIX


class ServerError(AnchorError):
    """The server answered with an error (a bad request, a cancelled or failed generation) or could not be reached."""


@dataclass
class ServedGeneration:
    text: str
    token_ids: list[int]
    finish_reason: str


def _image_bytes(image: Any) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    raise ServerError(f"image must be a path or encoded image bytes, got {type(image).__name__}")


class AnchorClient:
    def __init__(self, url: str = "127.0.0.1:8000", protocol: str = "http", model: str = MODEL_NAME,
                 timeout: float = 120.0):
        if protocol not in ("http", "grpc"):
            raise ServerError(f"protocol must be http or grpc, got {protocol!r}")
        try:
            if protocol == "http":
                import tritonclient.http as tc
            else:
                import tritonclient.grpc as tc
        except ImportError:
            raise BackendError("tritonclient is not installed; pip install 'anchorrt[serve]'") from None
        self.tc, self.protocol, self.model, self.timeout = tc, protocol, model, timeout
        kw = {"network_timeout": timeout, "connection_timeout": timeout} if protocol == "http" else {}
        self.client = tc.InferenceServerClient(url, **kw)

    def ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready() and self.client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - any transport failure means "not ready"
            return False

    def _inputs(self, image: Any, prompt: str) -> list:
        image_in = self.tc.InferInput("IMAGE", [1, 1], "BYTES")
        image_in.set_data_from_numpy(np.array([[_image_bytes(image)]], dtype=object))
        prompt_in = self.tc.InferInput("PROMPT", [1, 1], "BYTES")
        prompt_in.set_data_from_numpy(np.array([[prompt.encode("utf-8")]], dtype=object))
        return [image_in, prompt_in]

    def generate(self, image: Any, prompt: str, mitigation: dict | None = None, **sampling) -> ServedGeneration:
        """One request to the plain model; a server-side error is a one-line ServerError."""
        params = to_parameters(mitigation, **sampling)
        try:
            kw = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
            result = self.client.infer(self.model, self._inputs(image, prompt), parameters=params, **kw)
        except self.tc.InferenceServerException as exc:
            raise ServerError(_one_line(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the transports raise their own types (gevent, grpc): one line
            raise ServerError(f"no answer from the server ({type(exc).__name__}: {_one_line(exc)})") from None
        return _generation(result)

    def stream(self, image: Any, prompt: str, mitigation: dict | None = None, model: str | None = None,
               **sampling) -> Iterator[ServedGeneration]:
        """Token by token from the decoupled model (gRPC only): one ServedGeneration per response; the last one has
        the finish reason. Stops with a ServerError on an error response or after `timeout` s without one."""
        if self.protocol != "grpc":
            raise ServerError("streaming needs the gRPC protocol: AnchorClient(url_of_grpc_port, protocol='grpc')")
        answers: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            self.client.async_stream_infer(model or self.model + STREAM_SUFFIX, self._inputs(image, prompt),
                                           parameters=to_parameters(mitigation, **sampling))
            while True:
                try:
                    result, error = answers.get(timeout=self.timeout)
                except queue.Empty:
                    raise ServerError(f"no response for {self.timeout:.0f} s from the stream") from None
                if error is not None:
                    raise ServerError(_one_line(error))
                piece = _generation(result)
                yield piece
                if piece.finish_reason:
                    return
        finally:
            self.client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        self.client.close()


def _generation(result) -> ServedGeneration:
    text = result.as_numpy("TEXT").reshape(-1)[0]
    reason = result.as_numpy("FINISH_REASON").reshape(-1)[0]
    ids = result.as_numpy("TOKEN_IDS").reshape(-1)
    return ServedGeneration(text.decode("utf-8") if isinstance(text, bytes) else str(text),
                            [int(x) for x in ids], reason.decode() if isinstance(reason, bytes) else str(reason))


def _one_line(exc: Any) -> str:
    msg = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return " ".join(str(msg).split())
