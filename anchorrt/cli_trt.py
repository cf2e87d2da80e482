"""`anchorrt trt build ARTIFACT` (TensorRT engines into ARTIFACT/trt/) and the `inspect --trt-compat` report.

The compatibility check needs neither TensorRT nor a GPU. `trt build` needs both; without TensorRT it stops with one
line naming the install command before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from anchorrt.cli_common import friendly, say


def trt_compat_report(artifact_dir: Path, trt_version: str | None, verify: bool, as_json: bool) -> int:
    """Print the op table; -> exit code 0 (all supported) or 1 (some op or graph is not)."""
    from anchorrt.graph_passes.trt_compat import TABLE_VERSION, check_artifact

    report = check_artifact(artifact_dir, trt_version or TABLE_VERSION, verify=verify)
    if as_json:
        click.echo(json.dumps({"trt_version": report.trt_version, "source": report.source, "ok": report.ok,
                               "problems": report.problems, "notes": report.notes,
                               "ops": [{"graph": r.graph, "domain": r.domain, "op": r.op_type, "count": r.count,
                                        "supported": r.status, "reason": r.reason} for r in report.rows]}, indent=2))
    else:
        click.echo(report.table())
        for line in report.problems:
            click.echo(f"problem: {line}")
        for line in report.notes:
            click.echo(f"note: {line}")
        click.echo(report.summary())
    return 0 if report.ok else 1


@click.group("trt")
def trt_group() -> None:
    """TensorRT engines for an artifact folder (needs TensorRT >= 10 and an NVIDIA GPU)."""


@trt_group.command("build")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--precision", "flags", multiple=True, type=click.Choice(["fp16", "int8", "fp8"]),
              help="Builder precision flags (repeat; default: none, i.e. the graphs' own types). int8/fp8 act only "
                   "on graphs with Q/DQ nodes (explicit quantization): no calibrator is supplied.")
@click.option("--max-batch", default=1, show_default=True, type=int, help="Most decoder rows per call (IAVA: 2 per "
              "request).")
@click.option("--max-context", default=None, type=int, help="Most tokens (prompt + generated); default: the manifest's "
              "context_length.")
@click.option("--opt-context", default=None, type=int, help="Context length the kernels are tuned for.")
@click.option("--workspace-mb", default=4096, show_default=True, type=int, help="Builder workspace memory pool.")
@click.option("--force", is_flag=True, help="Rebuild engines that are already there.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artifact files.")
@friendly
def trt_build(artifact_dir: Path, flags, max_batch: int, max_context: int | None, opt_context: int | None,
              workspace_mb: int, force: bool, no_verify: bool) -> None:
    """Build one TensorRT engine per graph into ARTIFACT/trt/ (keyed by TensorRT version, GPU, flags, graph
    sha256, profiles) with a timing cache beside them; `generate --device trt` then runs them."""
    from anchorrt.runtime.trt_backend import EngineLimits, build_engines

    limits = EngineLimits(max_batch=max_batch, max_context=max_context, opt_context=opt_context)
    built = build_engines(artifact_dir, flags=tuple(flags), limits=limits, workspace_mb=workspace_mb, force=force,
                          verify=not no_verify, progress=say)
    for role, path in built.items():
        click.echo(f"{role}: {path}")
