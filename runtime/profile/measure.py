"""Measurement primitives: statistics over repeated samples, peak host RSS, NVML device memory, NVTX ranges and a
progress line. Nothing here knows about the pipeline.

Host memory: Linux keeps the peak resident set of a process as `VmHWM` in /proc/self/status, and writing "5" to
/proc/self/clear_refs resets that peak to the current RSS, so each measured run gets its own peak. Elsewhere (or when
the reset is refused) `resource.getrusage` gives the peak since the process started, and the report says so
(`resettable: false`).

Device memory: NVML (nvidia-ml-py, imported as `pynvml`) reports what the device holds; it is sampled at every stage
boundary, which catches onnxruntime's arena growth (the arena keeps what it grew to), not a transient inside a kernel.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np

now = time.perf_counter

STAT_KEYS = ("n", "median", "mean", "p10", "p25", "p75", "p90", "min", "max")


def summarize(samples) -> dict | None:
    """Median and spread of a list of numbers (seconds, bytes, ...); None when there are no samples."""
    x = np.asarray([s for s in samples if s is not None], dtype=np.float64)
    if x.size == 0:
        return None
    p10, p25, p50, p75, p90 = np.percentile(x, [10, 25, 50, 75, 90])
    return {"n": int(x.size), "median": float(p50), "mean": float(x.mean()), "p10": float(p10), "p25": float(p25),
            "p75": float(p75), "p90": float(p90), "min": float(x.min()), "max": float(x.max())}


class HostMemory:
    """Peak resident set size of this process, resettable per run where Linux allows it."""

    _STATUS = "/proc/self/status"
    _CLEAR = "/proc/self/clear_refs"

    def __init__(self) -> None:
        self.source = "VmHWM" if self._read_status("VmHWM") is not None else "ru_maxrss"
        self.resettable = self.source == "VmHWM" and self.reset()

    def reset(self) -> bool:
        """Make the current RSS the new peak. False where the kernel does not allow it."""
        try:
            with open(self._CLEAR, "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def peak_bytes(self) -> int:
        if self.source == "VmHWM":
            kb = self._read_status("VmHWM")
            if kb is not None:
                return kb * 1024
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux

    def current_bytes(self) -> int | None:
        kb = self._read_status("VmRSS")
        return None if kb is None else kb * 1024

    def _read_status(self, key: str) -> int | None:
        try:
            with open(self._STATUS) as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])  # "VmHWM:   123456 kB"
        except (OSError, ValueError, IndexError):
            return None
        return None


class DeviceMemory:
    """GPU memory through NVML, when the device is CUDA and nvidia-ml-py is importable; otherwise inert."""

    def __init__(self, device: str, device_id: int = 0) -> None:
        self.available = False
        self.reason = "not a GPU run" if device != "cuda" else ""
        self.name: str | None = None
        self._nvml = self._handle = None
        self._peak_used = self._peak_process = 0
        if device != "cuda":
            return
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (`pip install nvidia-ml-py`)"
            return
        try:
            pynvml.nvmlInit()
            self._handle = self._device_handle(pynvml, device_id)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as exc:  # noqa: BLE001 - NVML raises its own error classes; any of them means "no numbers"
            self.reason = f"NVML failed: {str(exc)[:120]}"
            return
        self._nvml = pynvml
        self.available = True

    @staticmethod
    def _device_handle(pynvml, device_id: int):
        # NVML counts every GPU; CUDA (and so onnxruntime's device_id) counts the visible ones only.
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if device_id < len(visible):
            v = visible[device_id]
            if v.isdigit():
                return pynvml.nvmlDeviceGetHandleByIndex(int(v))
            return pynvml.nvmlDeviceGetHandleByUUID(v)
        return pynvml.nvmlDeviceGetHandleByIndex(device_id)

    def reset(self) -> None:
        self._peak_used = self._peak_process = 0
        self.sample()

    def sample(self) -> None:
        if not self.available:
            return
        try:
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self._peak_used = max(self._peak_used, used)
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    self._peak_process = max(self._peak_process, int(proc.usedGpuMemory))
        except Exception:  # noqa: BLE001 - a failed sample leaves the peak as it was
            pass

    def peaks(self) -> dict:
        """{device_used_peak_bytes, process_used_peak_bytes}: None where not measured."""
        if not self.available:
            return {"device_used_peak_bytes": None, "process_used_peak_bytes": None}
        return {"device_used_peak_bytes": self._peak_used or None, "process_used_peak_bytes": self._peak_process or None}


class Ranges:
    """NVTX ranges (domain "anchorrt") around stages when the `nvtx` package is importable; no-ops otherwise."""

    def __init__(self, enabled: bool = True) -> None:
        self._nvtx = None
        if enabled:
            try:
                import nvtx

                self._nvtx = nvtx
            except ImportError:
                pass

    @property
    def active(self) -> bool:
        return self._nvtx is not None

    def range(self, name: str):
        if self._nvtx is None:
            return contextlib.nullcontext()
        return self._nvtx.annotate(message=name, domain="anchorrt")


class Progress:
    """One progress line on stderr: rewritten in place on a terminal, one line per update every few seconds else."""

    def __init__(self, enabled: bool = True, stream=None, every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self._last = 0.0
        self._width = 0

    def update(self, done: int, total: int, what: str, force: bool = False) -> None:
        if not self.enabled:
            return
        line = f"[{done:>{len(str(total))}}/{total}] {what}"
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
            self.stream.flush()
        elif force or now() - self._last >= self.every_s or done == total:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last = now()

    def note(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.tty and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.write(msg + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
