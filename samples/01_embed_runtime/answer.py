"""A minimal edge program: answer a question about an image with an AnchorRT artifact folder.

It needs numpy, onnxruntime, tokenizers and Pillow, and nothing else: no torch, no transformers.

    python answer.py ARTIFACT_DIR IMAGE "What is in the image?"
"""

from __future__ import annotations

import sys

from anchorrt.runtime import AnchorError, Pipeline


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(f"usage: {argv[0]} ARTIFACT_DIR IMAGE PROMPT", file=sys.stderr)
        return 2
    artifact, image, prompt = argv[1:]
    try:
        pipe = Pipeline.from_dir(artifact)  # checks every file's sha256 against the manifest
        result = pipe.generate(image, prompt, max_new_tokens=24,
                               on_token=lambda i, tok, piece: print(piece, end="", flush=True))
    except AnchorError as err:  # every user-fixable problem is one of these, with a one-line message
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    print()
    steps = result.timings["decode_steps_s"]
    print(f"{len(result.token_ids)} tokens, first token after {1000 * result.timings['prefill_s']:.1f} ms, "
          f"{len(steps) / max(sum(steps), 1e-9):.1f} tokens/s, stopped by {result.finish_reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
