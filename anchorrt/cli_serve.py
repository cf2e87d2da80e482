"""`anchorrt serve triton ARTIFACT -o REPO` (a Triton model repository) and `anchorrt serve ARTIFACT [--port]` (a local
Triton Inference Server on 127.0.0.1 serving that repository). See runtime/serving/ and README "Serving".

Writing the repository needs nothing beyond the runtime; serving needs `pip install 'anchorrt[serve]'`
(nvidia-pytriton, which bundles tritonserver): without it, one line says so before anything starts.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from anchorrt.cli_common import friendly, say


class _ServeGroup(click.Group):
    """`anchorrt serve ARTIFACT ...` runs the `run` subcommand; `anchorrt serve triton ...` writes a repository. An
    artifact folder literally named `triton` or `run` is reached as `anchorrt serve run ./triton`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def repository_options(fn):
    for option in reversed([
        click.option("--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
                     help="Triton instance group: KIND_CPU (onnxruntime CPU) or KIND_GPU (CUDA EP, one per GPU)."),
        click.option("--instances", default=1, show_default=True, type=int, help="Model instances (per GPU for gpu)."),
        click.option("--gpus", default=None, metavar="0,1", help="GPU ids for --kind gpu (default: all)."),
        click.option("--max-batch-size", default=None, type=int,
                     help="Requests per dynamic batch [default: the manifest's serving.max_batch_size, else 8]."),
        click.option("--max-queue-delay-us", default=2000, show_default=True, type=int,
                     help="How long the dynamic batcher waits to fill a batch."),
        click.option("--no-stream", is_flag=True, help="Leave out the decoupled (token streaming) model."),
        click.option("--threads", "intra_op_threads", default=None, type=int, help="onnxruntime threads per instance."),
        click.option("--max-image-pixels", default=None, type=int, help="Largest width*height accepted (default 64 Mpx)."),
        click.option("--max-new-tokens-limit", default=1024, show_default=True, type=int,
                     help="Requests asking for more new tokens are refused."),
        click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artifact (here and at model load)."),
    ]):
        fn = option(fn)
    return fn


def _write(artifact_dir: Path, out: Path, force: bool, kind, instances, gpus, max_batch_size, max_queue_delay_us,
           no_stream, intra_op_threads, max_image_pixels, max_new_tokens_limit, no_verify) -> Path:
    from anchorrt.runtime.errors import FlagError
    from anchorrt.runtime.serving.repository import write_repository

    try:
        gpu_ids = tuple(int(g) for g in gpus.split(",")) if gpus else ()
    except ValueError:
        raise FlagError(f"--gpus must be comma-separated GPU ids like 0,1, got {gpus!r}") from None
    if gpu_ids and kind != "gpu":
        raise FlagError("--gpus needs --kind gpu")
    return write_repository(artifact_dir, out, kind=kind, instances=instances, gpus=gpu_ids,
                            max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                            streaming=not no_stream, force=force, verify=not no_verify,
                            intra_op_threads=intra_op_threads, max_image_pixels=max_image_pixels,
                            max_new_tokens_limit=max_new_tokens_limit)


def first_request(server) -> None:
    """One 1-token request: Triton reports ready once the models loaded, but a Python-backend stub that links another
    libpython than this environment's only crashes on the first request ("Stub process ... is not healthy")."""
    import io

    from PIL import Image

    from anchorrt.runtime.errors import BackendError
    from anchorrt.runtime.serving.client import AnchorClient, ServerError

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, "PNG")
    try:
        AnchorClient(server.http_url.removeprefix("http://")).generate(buf.getvalue(), "Describe the image.",
                                                                      max_new_tokens=1)
    except ServerError as exc:
        hint = ("; the Python backend stub crashed: make the virtual environment from /usr/bin/python3 (the stub links "
                "the system libpython)") if "not healthy" in str(exc) else ""
        raise BackendError(f"the served model failed its first request: {str(exc).rstrip('.')}{hint}") from None


@click.group("serve", cls=_ServeGroup)
def serve_group() -> None:
    """Serve an artifact on NVIDIA Triton Inference Server: `serve triton ARTIFACT -o REPO` writes a model repository
    for any Triton deployment; `serve ARTIFACT [--port 8000]` runs one locally on 127.0.0.1."""


@serve_group.command("triton")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Repository folder to write.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (atomically).")
@repository_options
@friendly
def serve_triton(artifact_dir: Path, out: Path, force: bool, **options) -> None:
    """Write a Triton model repository (Python backend running the Pipeline) for ARTIFACT_DIR."""
    repo = _write(artifact_dir, out, force, **options)
    models = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    say(f"wrote {repo} (models: {', '.join(models)}); serve it with: tritonserver --model-repository {repo}")


@serve_group.command("run")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--port", default=8000, show_default=True, type=int, help="HTTP port on 127.0.0.1.")
@click.option("--grpc-port", default=None, type=int, help="gRPC port on 127.0.0.1 [default: PORT + 1].")
@click.option("--metrics-port", default=None, type=int, help="Prometheus metrics on 127.0.0.1 (default: off).")
@click.option("--repository", "repo_dir", default=None, type=click.Path(path_type=Path),
              help="Write the model repository here (kept) instead of a temporary folder.")
@click.option("--log", "log_file", default=None, type=click.Path(path_type=Path), help="tritonserver's log file.")
@click.option("--ready-timeout", default=300.0, show_default=True, type=float, help="Seconds to wait for readiness.")
@repository_options
@friendly
def serve_run(artifact_dir: Path, port: int, grpc_port, metrics_port, repo_dir, log_file, ready_timeout,
              **options) -> None:
    """Serve ARTIFACT_DIR on a local Triton (127.0.0.1) until Ctrl-C; health at /v2/health/ready."""
    from anchorrt.runtime.errors import BackendError
    from anchorrt.runtime.serving.server import LocalTriton, find_tritonserver

    find_tritonserver()  # not installed: one line, before the repository is written
    with tempfile.TemporaryDirectory(prefix="anchorrt-repo-") as tmp:
        repo = _write(artifact_dir, repo_dir or Path(tmp) / "repo", repo_dir is not None, **options)
        server = LocalTriton(repo, http_port=port, grpc_port=grpc_port, metrics_port=metrics_port, log_file=log_file)
        say(f"starting tritonserver on {repo} ...")
        t = time.perf_counter()
        server.start(timeout=ready_timeout)
        try:
            first_request(server)
            models = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
            say(f"ready in {time.perf_counter() - t:.1f} s: HTTP {server.http_url}, gRPC {server.grpc_url}; models "
                f"{', '.join(models)}; health {server.http_url}/v2/health/ready; Ctrl-C stops")
            while server.process.poll() is None:
                time.sleep(0.5)
            raise BackendError(f"tritonserver exited with code {server.process.returncode}: {server._failure()}")
        finally:
            server.stop()
