"""`anchorrt profile`: where the time goes in an exported model, torch-free.

    from anchorrt.runtime.profile import ProfileSettings, run_profile, write_outputs
    report = run_profile("out/llava", ProfileSettings(batch_sizes=(1, 2), repeats=5))
    write_outputs(report, "profile-out")            # profile.json (+ PNG plots)

Per-stage timings on the pipeline's own generate loop (runtime.profile.stages), sweeps over batch size, context
length and image count with the baked mitigation methods on/off interleaved (runtime.profile.sweep), peak host RSS,
NVML device memory and NVTX ranges where available (runtime.profile.measure), the JSON report and its schema and the
terminal table (runtime.profile.report), PNG plots (runtime.profile.plots, needs matplotlib).
"""

from __future__ import annotations

import json
from pathlib import Path

from anchorrt.runtime.profile.report import SchemaError, format_table, validate_report
from anchorrt.runtime.profile.sweep import ProfileSettings, run_profile

__all__ = ["ProfileSettings", "run_profile", "write_outputs", "format_table", "validate_report", "SchemaError"]

REPORT_NAME = "profile.json"


def write_outputs(report: dict, out: str | Path, plots: bool = True) -> Path:
    """Write the plots (listed in report["plots"]) and profile.json into `out`; returns the JSON path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        from anchorrt.runtime.profile.plots import write_plots

        report["plots"] = write_plots(report, out)
    validate_report(report)
    path = out / REPORT_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
