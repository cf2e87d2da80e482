"""A local Triton Inference Server on loopback, from the `tritonserver` that the `nvidia-pytriton` wheel bundles.

    with LocalTriton(repo, http_port=8000) as server:     # starts, waits for /v2/health/ready
        ...                                               # http://127.0.0.1:8000, gRPC 127.0.0.1:8001

What the wheel holds (nvidia-pytriton 0.7, Triton 2.51): `pytriton/tritonserver/bin/tritonserver`, the Python
backend (`backends/python/libtriton_python.so` and `triton_python_backend_utils.py`), one backend stub per Python
version (`python_backend_stubs/3.X/triton_python_backend_stub`) and the shared libraries in
`site-packages/nvidia_pytriton.libs`. The Python backend looks for its stub in the backend directory, so a private
backend directory is assembled in a temporary folder with the stub of the running Python. The stub embeds the
system `libpython3.X` and finds its packages through the first `python3` on PATH: this interpreter's folder goes
first, so the model runs with this environment's numpy/onnxruntime. A virtual environment made from another
3.X build than the one the stub links fails at model load (`'_thread.RLock' object has no attribute
'_recursion_count'`, ../shared/FIELD-NOTES.md): make it from /usr/bin/python3.

Every endpoint listens on 127.0.0.1 only. Health: GET /v2/health/live and /v2/health/ready (KServe v2 protocol,
https://github.com/kserve/kserve/blob/master/docs/predict-api/v2/required_api.md).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from anchorrt.runtime.errors import BackendError

INSTALL = "pip install 'anchorrt[serve]' (nvidia-pytriton bundles tritonserver)"
LOOPBACK = "127.0.0.1"


def find_tritonserver() -> Path:
    """The `pytriton/tritonserver` folder of the nvidia-pytriton wheel, or a one-line BackendError."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"tritonserver is not installed; {INSTALL}, or run the repository on your Triton: "
                           "tritonserver --model-repository REPO")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise BackendError(f"nvidia-pytriton at {root.parent} has no tritonserver binary; reinstall: {INSTALL}")
    return root


def _shm_regions() -> list[str]:
    try:
        return [os.path.join("/dev/shm", n) for n in os.listdir("/dev/shm") if n.startswith("triton_python_backend_shm")]
    except OSError:
        return []


def http_ready(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class LocalTriton:
    """One tritonserver process serving `repository` on 127.0.0.1 (HTTP, gRPC; metrics off unless a port is given)."""

    def __init__(self, repository: str | Path, http_port: int = 8000, grpc_port: int | None = None,
                 metrics_port: int | None = None, log_file: str | Path | None = None, verbose: bool = False):
        self.repository = Path(repository).resolve()
        if not (self.repository.is_dir() and any(self.repository.glob("*/config.pbtxt"))):
            raise BackendError(f"{repository} is not a Triton model repository (no */config.pbtxt); "
                               "write one with `anchorrt serve triton ARTIFACT -o REPO`")
        for what, port in (("http_port", http_port), ("grpc_port", grpc_port), ("metrics_port", metrics_port)):
            if port is not None and not (isinstance(port, int) and 0 < port < 65536):
                raise BackendError(f"{what} must be a TCP port in 1..65535, got {port!r}")
        self.http_port = http_port
        self.grpc_port = grpc_port if grpc_port is not None else http_port + 1
        self.metrics_port = metrics_port
        self.log_file = Path(log_file) if log_file else None
        self.verbose = verbose
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._shm_before: set[str] = set()
        self._log = None

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def command(self, backends: Path) -> list[str]:
        cmd = [str(self._root / "bin" / "tritonserver"), f"--model-repository={self.repository}",
               f"--backend-directory={backends}", f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
               f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}", "--strict-readiness=true",
               "--exit-on-error=true", f"--log-verbose={1 if self.verbose else 0}"]
        if self.metrics_port is None:
            cmd.append("--allow-metrics=false")
        else:
            cmd += [f"--metrics-address={LOOPBACK}", f"--metrics-port={self.metrics_port}"]
        return cmd

    def start(self, timeout: float = 120.0) -> LocalTriton:
        """Start and wait until the server is ready (every model loaded); a failure is one line with the cause."""
        if self.process is not None and self.process.poll() is None:
            return self
        self._root = find_tritonserver()
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = self._root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise BackendError(f"nvidia-pytriton has no Python backend stub for Python {version}; use Python 3.8-3.13")
        if http_ready(self.http_url, timeout=0.5):
            raise BackendError(f"port {self.http_port} already serves a Triton; stop it or pass another --port")
        self._shm_before = set(_shm_regions())
        self._workdir = Path(tempfile.mkdtemp(prefix="anchorrt-triton-"))
        backends = self._workdir / "backends"
        shutil.copytree(self._root / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        env = dict(os.environ)
        libs = self._root.parents[1] / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        log_path = self.log_file or self._workdir / "tritonserver.log"
        self._log_path = Path(log_path)
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(self.command(backends), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                reason = self._failure()
                self.stop()
                raise BackendError(f"tritonserver exited while starting: {reason}")
            if http_ready(self.http_url, timeout=1.0):
                return self
            time.sleep(0.25)
        reason = self._failure()
        self.stop()
        raise BackendError(f"tritonserver was not ready after {timeout:.0f} s ({reason}); see its log")

    def ready(self) -> bool:
        return self.process is not None and self.process.poll() is None and http_ready(self.http_url)

    def kill(self) -> None:
        """SIGKILL, no clean shutdown (the load test's fault injection); the Python-backend stubs go with it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.stop()  # the session's other processes, the temporary backend folder

    def _remove_shm(self) -> None:
        """Shared-memory regions the Python backend made and a killed server left in /dev/shm (only those that
        appeared since this server started and that no live process maps: another server's stay)."""
        mapped = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/maps") as maps:
                        mapped.update(ln.split()[-1] for ln in maps if "triton_python_backend_shm" in ln)
                except OSError:
                    continue
        for path in set(_shm_regions()) - self._shm_before - mapped:
            try:
                os.unlink(path)
            except OSError:
                pass

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # tritonserver's clean shutdown
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        if self.process is not None:
            try:  # the stub processes are in the server's session: none may outlive it
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._remove_shm()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir / "backends", ignore_errors=True)
            if self.log_file is None:
                shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def log_text(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except (AttributeError, OSError):
            return ""

    def _failure(self) -> str:
        """The most telling line of the server's log: the first model that did not load and why."""
        text = self.log_text()
        if "_recursion_count" in text:
            return ("the Python backend stub links another libpython than this environment's; make the virtual "
                    "environment from /usr/bin/python3")
        unavailable = re.findall(r"^\|\s*(\S+)\s*\|\s*\d+\s*\|\s*UNAVAILABLE: (.*?)\s*\|\s*$", text, re.M)
        if unavailable:
            name, why = unavailable[0]
            hint = ""
            if "ModuleNotFoundError" in why:
                hint = f"; install anchorrt[cpu] into the environment of {sys.executable} (the backend uses it)"
            return f"model {name} did not load: {why}{hint}"[:400]
        lines = [ln for ln in text.splitlines() if ln.startswith("E") or "error" in ln.lower()]
        lines = [ln for ln in lines if "CudaDriverHelper" not in ln] or lines
        return (lines[-1].strip() if lines else "no log output")[:400]

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
