"""AnchorRT's Triton Python-backend model: the runtime's Pipeline behind Triton's dynamic batcher (issue 19).

`anchorrt serve triton` copies this file to `REPO/<model>/1/model.py`. It imports numpy, the runtime and
`triton_python_backend_utils` (the module the Python backend provides), never torch. The Python backend's model
interface (`TritonPythonModel.initialize/execute/finalize`, `pb_utils.get_input_tensor_by_name`,
`request.parameters()`, `InferenceResponse(output_tensors, error)`, the response sender of decoupled models and
`TRITONSERVER_RESPONSE_COMPLETE_FINAL`) is documented at https://github.com/triton-inference-server/python_backend
(README: "Usage", "Decoupled mode", "Inference Request Parameters", "Request Cancellation Handling").

One `execute` call receives the requests that Triton's dynamic batcher put together (up to `max_batch_size`):

    requests ─┬─ parse: IMAGE bytes → PIL image (size checked first), PROMPT → str, parameters → sampling + flags
              │    └─ a bad request gets its own one-line error response; the others go on
              ├─ group by sampling options (one SamplingConfig per Pipeline call; a seeded sampled request runs
              │    alone so that its random stream is the one the local Pipeline would use)
              └─ Pipeline.generate_batch(group): mitigation flags per row (plain and mitigated rows side by side)
                   ├─ plain model:   one response per request: TEXT [1], TOKEN_IDS [n], FINISH_REASON [1]
                   └─ decoupled:     one response per new token (TEXT piece, TOKEN_IDS [1]), then a last one with
                                     the remaining ids (a stop token), FINISH_REASON and the FINAL flag

Model-config `parameters` (written by runtime/serving/repository.py; paths relative to the version folder):
`artifact`, `runtime_path`, `verify` ("true"/"false"), `intra_op_threads`, `max_image_pixels`,
`max_new_tokens_limit`.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))


class _AllCancelled(Exception):
    """Every request of a streamed group was cancelled by its client: stop generating."""


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.config = config
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], str(args["model_version"]))
        runtime_path = os.path.normpath(os.path.join(version_dir, params.get("runtime_path", ".")))
        if os.path.isdir(os.path.join(runtime_path, "runtime")) and runtime_path not in sys.path:
            sys.path.insert(0, runtime_path)  # the runtime copied into the repository (else: an installed anchorrt)
        from anchorrt.runtime.backend import CUDA_DEFAULTS
        from anchorrt.runtime.pipeline import Pipeline
        from anchorrt.runtime.serving.params import methods_of

        if args.get("model_instance_kind") == "GPU":
            device = int(args.get("model_instance_device_id", 0))
            providers = [("CUDAExecutionProvider", {**CUDA_DEFAULTS, "device_id": str(device)}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        threads = int(params["intra_op_threads"]) if params.get("intra_op_threads") else None
        self.max_image_pixels = int(params["max_image_pixels"]) if params.get("max_image_pixels") else None
        self.max_new_tokens_limit = int(params.get("max_new_tokens_limit") or 1024)
        artifact = os.path.normpath(os.path.join(version_dir, params.get("artifact", "artifact")))
        self.pipe = Pipeline.from_dir(artifact, providers=providers, verify=params.get("verify", "true") == "true",
                                      intra_op_threads=threads, max_image_pixels=self.max_image_pixels)
        for backend in (self.pipe.vision, self.pipe.embed, self.pipe.decoder):
            _ = backend.session  # open now: a missing CUDA provider fails the model load, not the first request
        self.methods = methods_of(self.pipe.manifest.mitigation, self.pipe.visalign is not None)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    # -- one batch -----------------------------------------------------------------------------------------------
    def execute(self, requests):
        from anchorrt.runtime.errors import AnchorError

        parsed: list = []
        for request in requests:
            try:
                parsed.append(self._parse(request))
            except AnchorError as exc:
                parsed.append(exc)
        senders = [r.get_response_sender() for r in requests] if self.decoupled else None
        responses: list = [None] * len(requests)
        groups: dict = {}
        for i, item in enumerate(parsed):
            if isinstance(item, AnchorError):
                self._fail(i, str(item), responses, senders)
            elif _cancelled(requests[i], senders[i] if senders else None):  # gave up while queued
                self._fail(i, "request cancelled by the client", responses, senders, cancelled=True)
            else:
                request_obj, sampling = item
                key = tuple(sorted(sampling.items()))
                if sampling.get("do_sample") and sampling.get("seed") is not None:
                    key = (("_alone", i),)  # row 0 of its own call: the seed the local Pipeline would use
                groups.setdefault(key, ([], sampling))[0].append(i)
        for idx, sampling in groups.values():
            self._run_group(idx, [parsed[i][0] for i in idx], sampling, responses, senders)
        return None if self.decoupled else responses

    def finalize(self) -> None:
        self.pipe = None

    # -- internals -------------------------------------------------------------------------------------------------
    def _parse(self, request):
        """One Triton request -> (runtime Request, sampling kwargs), or an AnchorError (one line) for this request."""
        from anchorrt.runtime.errors import FlagError, ImageError, PromptError
        from anchorrt.runtime.pipeline import Request
        from anchorrt.runtime.preprocess import load_image
        from anchorrt.runtime.serving.params import parse_parameters

        image = _single(pb_utils.get_input_tensor_by_name(request, "IMAGE"), "IMAGE", ImageError)
        prompt = _single(pb_utils.get_input_tensor_by_name(request, "PROMPT"), "PROMPT", PromptError)
        if isinstance(prompt, bytes):
            try:
                prompt = prompt.decode("utf-8")
            except UnicodeDecodeError:
                raise PromptError("PROMPT is not valid UTF-8 text; send the prompt as UTF-8") from None
        sampling, mitigation = parse_parameters(request.parameters(), self.methods)
        limit = self.max_new_tokens_limit
        if sampling.get("max_new_tokens", 0) > limit:
            raise FlagError(f"max_new_tokens {sampling['max_new_tokens']} is over this server's limit of {limit}; "
                            "ask for fewer (the repository's max_new_tokens_limit parameter sets it)")
        self.pipe._sampling_config(dict(sampling))  # bad values fail here, for this request only
        # the flags too (as generate_batch would), before the image is decoded
        from anchorrt.runtime.iava import parse_iava
        from anchorrt.runtime.mitigation import parse_request
        from anchorrt.runtime.visalign import requested

        spec = mitigation or {}
        parse_request(spec, self.pipe.manifest.mitigation)
        parse_iava(spec.get("iava"))
        requested(spec, 1, False)
        if not isinstance(image, (bytes, bytearray)):
            raise ImageError("IMAGE must be the encoded bytes of an image file (BYTES tensor)")
        pil = load_image(bytes(image), max_pixels=self.max_image_pixels)  # size checked before the pixels decode
        return Request(pil, prompt, mitigation), sampling

    def _run_group(self, idx: list[int], reqs: list, sampling: dict, responses: list, senders) -> None:
        from anchorrt.runtime.errors import AnchorError

        on_token = None
        sent: dict[int, int] = {}
        cancelled: set[int] = set()
        if senders is not None:
            def on_token(row: int, token: int, piece: str) -> None:
                i = idx[row]
                if i in cancelled:
                    return
                if senders[i].is_cancelled():
                    cancelled.add(i)
                    self._fail(i, "request cancelled by the client", responses, senders, cancelled=True)
                    if len(cancelled) == len(idx):
                        raise _AllCancelled
                    return
                senders[i].send(_response(piece, [token]))
                sent[i] = sent.get(i, 0) + 1
        try:
            results = self.pipe.generate_batch(reqs, on_token=on_token, **sampling)
        except _AllCancelled:
            return
        except AnchorError as exc:
            for i in idx:
                if i not in cancelled:
                    self._fail(i, str(exc), responses, senders)
            return
        for i, g in zip(idx, results):
            if senders is None:
                responses[i] = _response(g.text, g.token_ids, g.finish_reason)
            elif i not in cancelled:
                rest = g.token_ids[sent.get(i, 0):]  # the stop token, which is never streamed as text
                senders[i].send(_response("", rest, g.finish_reason), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def _fail(i: int, message: str, responses: list, senders, cancelled: bool = False) -> None:
        # a request the caller can fix is INVALID_ARG (HTTP 400), not the default INTERNAL (500)
        code = getattr(pb_utils.TritonError, "CANCELLED" if cancelled else "INVALID_ARG", None)
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        response = pb_utils.InferenceResponse(output_tensors=[], error=error)
        if senders is None:
            responses[i] = response
        else:
            senders[i].send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _cancelled(request, sender) -> bool:
    """Request cancellation (Triton >= 23.10; `is_cancelled()` on the request, or on the response sender in
    decoupled mode)."""
    check = getattr(sender if sender is not None else request, "is_cancelled", None)
    return bool(check()) if check is not None else False


def _single(tensor, name: str, error):
    """The one element of a [1, 1] BYTES input (batch dim 1, dims [1])."""
    if tensor is None:
        raise error(f"the request has no {name} input; send IMAGE (encoded image bytes) and PROMPT (UTF-8 text)")
    array = tensor.as_numpy()
    if array.size != 1:
        raise error(f"{name} must hold one element per request, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _response(text: str, token_ids: list[int], finish_reason: str = ""):
    """Every response carries the three outputs (a streamed token's FINISH_REASON is empty)."""
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("TEXT", np.array([[text.encode("utf-8")]], dtype=object)),  # [1, 1]
        pb_utils.Tensor("TOKEN_IDS", np.asarray(token_ids, dtype=np.int64).reshape(1, -1)),  # [1, n]
        pb_utils.Tensor("FINISH_REASON", np.array([[finish_reason.encode()]], dtype=object)),  # [1, 1]
    ])
