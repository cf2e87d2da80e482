"""Ask a served artifact (`anchorrt serve`, or any Triton serving a repository from `anchorrt serve triton`).

    python samples/02_triton/ask.py --url 127.0.0.1:8000 cat.jpg "Is there a dog?" --param clva=true --param sevi.omega=0.7
    python samples/02_triton/ask.py --url 127.0.0.1:8001 --stream cat.jpg "Describe it."        # gRPC, token by token

`--param KEY=VALUE` is a request parameter (README "Serving"): true/false, a number, or text. A server-side error
(a flag the artifact lacks, a bad image) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from anchorrt.runtime.errors import AnchorError
from anchorrt.runtime.serving.client import AnchorClient


def value(text: str):
    try:
        return json.loads(text)  # true, false, 14, 0.7
    except ValueError:
        return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("prompt")
    ap.add_argument("--url", default="127.0.0.1:8000")
    ap.add_argument("--stream", action="store_true", help="the decoupled model over gRPC (give the gRPC port)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    mitigation: dict = {}
    sampling: dict = {}
    try:
        for item in args.param:
            key, sep, raw = item.partition("=")
            if not sep:
                raise AnchorError(f"--param wants KEY=VALUE, got {item!r}")
            method, dot, name = key.partition(".")
            if method in ("clva", "sevi", "iava", "visalign"):
                setting = mitigation.get(method)
                if dot:
                    mitigation[method] = {**(setting if isinstance(setting, dict) else {}), name: value(raw)}
                elif not isinstance(setting, dict):
                    mitigation[method] = value(raw)
            else:
                sampling[key] = value(raw)
        if args.stream:
            client = AnchorClient(args.url, protocol="grpc")
            for piece in client.stream(args.image, args.prompt, mitigation=mitigation or None, **sampling):
                print(piece.text, end="", flush=True)
            print()
        else:
            out = AnchorClient(args.url).generate(args.image, args.prompt, mitigation=mitigation or None, **sampling)
            print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
    except (AnchorError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
