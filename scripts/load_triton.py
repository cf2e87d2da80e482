"""Load test of an artifact served on Triton Inference Server (issue 19), on 127.0.0.1 only.

    python scripts/load_triton.py --artifact out/demo-llava-onnx --out out/load [--requests 48] [--max-seconds 120]

1. Writes the model repository (runtime/serving/repository.py) and starts the bundled tritonserver on loopback.
2. Builds a pool of mixed requests: scenes of the demo world (runtime/eval/world.py), existence questions and
   captions, mitigation flags drawn from plain / CLVA / SEVI / CLVA+SEVI / IAVA / CLVA with other values (only the
   methods the artifact carries); the local Pipeline's greedy answer for each (the reference).
3. For each concurrency level (1, 4, 16): N client threads, each with its own HTTP client, send requests from the
   pool until `--requests` are done or `--max-seconds` pass; every answer is compared with the reference, token for
   token. Throughput (requests/s, new tokens/s), latency p50/p99, mismatches and errors per level.
4. Faults: a malformed request (no PROMPT input; a parameter that is not ours; a non-UTF-8 prompt), an oversized
   image (declared width*height over the limit), a gRPC stream the client drops after its first tokens, the server
   killed (SIGKILL) under load from 4 clients (every client must get an error, none may hang), then restarted
   (it must answer correctly again).
5. Memory: RSS of tritonserver and its Python-backend stubs after warm-up (before) and after the load.
Writes results.json, table.md and latency.png into --out. Bounded: each level stops at --requests or
--max-seconds, each request times out after --request-timeout; exit 1 when a check failed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anchorrt.runtime.errors import AnchorError  # noqa: E402

LEVELS = (1, 4, 16)
PROMPTS = ["Please describe this image in detail.", "What is in the image?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def request_pool(pipe, n_images: int, max_new_tokens: int, seed: int = 0, plain_only: bool = False) -> list[dict]:
    """Mixed (image, prompt, flags) requests and the local Pipeline's greedy answer for each."""
    from anchorrt.runtime.eval.world import SHAPES, YES_NO_SUFFIX, World, existence_question
    from anchorrt.runtime.serving.params import methods_of

    methods = methods_of(pipe.manifest.mitigation, pipe.visalign is not None)
    flags = [None]
    for spec in ({"clva": True}, {"sevi": True}, {"clva": True, "sevi": True}, {"iava": True},
                 {"clva": {"alpha": 8.0, "beta": 0.8}}, {"sevi": {"omega": 1.0}}, {"visalign": True}):
        if all(m in methods for m in spec) and not plain_only:
            flags.append(spec)
    world, rng = World(), np.random.default_rng(seed)
    images = [png(np.asarray(world.image(world.sample_scene(rng)))) for _ in range(n_images)]
    prompts = PROMPTS + [existence_question(s) + YES_NO_SUFFIX for s in SHAPES[:4]]
    pool = []
    for k in range(max(len(flags), n_images) * 2):
        img, prompt, spec = images[k % n_images], prompts[k % len(prompts)], flags[k % len(flags)]
        ref = pipe.generate(img, prompt, mitigation=spec, max_new_tokens=max_new_tokens)
        pool.append({"image": img, "prompt": prompt, "mitigation": spec, "tokens": ref.token_ids})
    return pool


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_level(http_url: str, pool: list[dict], clients: int, requests: int, max_seconds: float, max_new_tokens: int,
              timeout: float) -> dict:
    from anchorrt.runtime.serving.client import AnchorClient

    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    mismatches: list[int] = []
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        client = AnchorClient(http_url, timeout=timeout)
        while time.monotonic() < deadline:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            item = pool[k % len(pool)]
            t = time.perf_counter()
            try:
                out = client.generate(item["image"], item["prompt"], mitigation=item["mitigation"],
                                      max_new_tokens=max_new_tokens)
            except AnchorError as exc:
                with lock:
                    errors.append(str(exc))
                continue
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                tokens[0] += len(out.token_ids)
                if out.token_ids != item["tokens"]:
                    mismatches.append(k)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=max_seconds + timeout + 10)
    wall = time.perf_counter() - t0
    done = len(latencies)
    return {"clients": clients, "requests": done, "wall_s": wall, "req_per_s": done / wall,
            "tokens_per_s": tokens[0] / wall, "p50_ms": 1e3 * percentile(latencies, 50),
            "p99_ms": 1e3 * percentile(latencies, 99), "errors": len(errors), "error_samples": errors[:3],
            "mismatches": len(mismatches), "hung_threads": sum(th.is_alive() for th in threads)}


def rss_mb(pid: int) -> float:
    """RSS of the server and every process of its session (the Python-backend stubs), MiB."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != pid:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024


def faults(server, pool: list[dict], max_new_tokens: int, timeout: float) -> dict:
    import tritonclient.http as httpclient
    from anchorrt.runtime.serving.client import AnchorClient, ServerError

    out: dict = {}
    host = server.http_url.removeprefix("http://")
    client = AnchorClient(host, timeout=timeout)
    item = pool[0]

    # malformed: no PROMPT tensor (Triton refuses it before the model), a parameter that is not ours, bad UTF-8
    raw = httpclient.InferenceServerClient(host, network_timeout=timeout)
    image_in = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
    image_in.set_data_from_numpy(np.array([[item["image"]]], dtype=object))
    cases = {}
    try:
        raw.infer("anchorrt", [image_in])
        cases["missing_prompt"] = "answered (wrong)"
    except httpclient.InferenceServerException as exc:
        cases["missing_prompt"] = " ".join(str(exc).split())[:200]
    for name, call in (("unknown_parameter", lambda: client.generate(item["image"], "x", mitigation={"clva": {"alpah": 1}})),
                       ("bad_utf8_prompt", lambda: _bad_utf8(raw, item["image"])),
                       ("oversized_image", lambda: client.generate(_oversized_png(), "What is in the image?"))):
        try:
            call()
            cases[name] = "answered (wrong)"
        except (ServerError, httpclient.InferenceServerException) as exc:
            cases[name] = " ".join(str(exc).split())[:200]
    out["malformed"] = cases
    out["malformed_ok"] = all(not v.startswith("answered") for v in cases.values())

    # a client that drops a stream after its first tokens; the server keeps serving
    from anchorrt.runtime.serving.client import AnchorClient as Client

    grpc = Client(server.grpc_url, protocol="grpc", timeout=timeout)
    got = 0
    stream = grpc.stream(item["image"], PROMPTS[0], max_new_tokens=max(8, max_new_tokens))
    for _ in stream:
        got += 1
        if got == 2:
            break
    stream.close()  # stop_stream(cancel_requests=True): the server sees the cancellation
    grpc.close()
    after = client.generate(item["image"], item["prompt"], mitigation=item["mitigation"], max_new_tokens=max_new_tokens)
    out["disconnect"] = {"tokens_before_drop": got, "served_after": after.token_ids == item["tokens"],
                         "server_ready": server.ready()}

    # the server killed under load: every client gets an error, none hangs; then restarted
    results: queue.Queue = queue.Queue()

    def loader() -> None:
        c = AnchorClient(host, timeout=timeout)
        n_ok = 0
        for k in range(10_000):
            p = pool[k % len(pool)]
            try:
                c.generate(p["image"], p["prompt"], mitigation=p["mitigation"], max_new_tokens=max_new_tokens)
                n_ok += 1
            except AnchorError as exc:
                results.put(("error", n_ok, str(exc)[:160]))
                return
        results.put(("no error", n_ok, ""))

    threads = [threading.Thread(target=loader, daemon=True) for _ in range(4)]
    for th in threads:
        th.start()
    time.sleep(1.5)
    t_kill = time.perf_counter()
    server.kill()
    for th in threads:
        th.join(timeout=timeout + 10)
    seen = [results.get_nowait() for _ in range(results.qsize())]
    out["kill"] = {"clients": len(threads), "errors": sum(1 for s in seen if s[0] == "error"),
                   "hung": sum(th.is_alive() for th in threads),
                   "all_errored_within_s": round(time.perf_counter() - t_kill, 2),
                   "answered_before_kill": sum(s[1] for s in seen), "error_samples": sorted({s[2] for s in seen})[:2]}
    t = time.perf_counter()
    server.start()
    again = AnchorClient(host, timeout=timeout).generate(item["image"], item["prompt"], mitigation=item["mitigation"],
                                                         max_new_tokens=max_new_tokens)
    out["restart"] = {"ready_after_s": round(time.perf_counter() - t, 2), "served_again": again.token_ids == item["tokens"]}
    out["ok"] = (out["malformed_ok"] and out["disconnect"]["served_after"] and out["kill"]["hung"] == 0
                 and out["kill"]["errors"] == len(threads) and out["restart"]["served_again"])
    return out


def _bad_utf8(raw, image: bytes):
    import tritonclient.http as httpclient

    inputs = [httpclient.InferInput("IMAGE", [1, 1], "BYTES"), httpclient.InferInput("PROMPT", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[image]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[b"\xff\xfe what?"]], dtype=object))
    return raw.infer("anchorrt", inputs)


def _oversized_png() -> bytes:
    """A valid PNG of 9000 x 9000 (81 Mpx, over the default 64 Mpx) that compresses to ~80 KB."""
    return png(np.zeros((9000, 9000), dtype=np.uint8))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    rows = list({r["clients"]: r for r in rows}.values())  # a repeated level: its last run
    x = [r["clients"] for r in rows]
    a.plot(x, [r["req_per_s"] for r in rows], "o-")
    a.set(xscale="log", xticks=x, xticklabels=x, xlabel="concurrent clients", ylabel="requests / s", title="throughput")
    b.plot(x, [r["p50_ms"] for r in rows], "o-", label="p50")
    b.plot(x, [r["p99_ms"] for r in rows], "s--", label="p99")
    b.set(xscale="log", xticks=x, xticklabels=x, xlabel="concurrent clients", ylabel="latency (ms)", title="latency")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    lines = ["| clients | requests | req/s | new tok/s | p50 ms | p99 ms | errors | mismatches | mean batch "
             "| server RSS after (MiB) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | {r['mismatches']} | "
                     f"{r['mean_batch']:.2f} | {r['rss_after_mb']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "load_triton")
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time bound per concurrency level")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads per model instance (and the reference)")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    ap.add_argument("--max-batch-size", type=int, default=None)
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--plain-only", action="store_true", help="no mitigation flags (to separate their cost)")
    args = ap.parse_args()
    if args.requests < 1 or args.max_seconds <= 0:
        ap.error("--requests must be >= 1 and --max-seconds > 0")

    from anchorrt.runtime import Pipeline
    from anchorrt.runtime.serving.repository import write_repository
    from anchorrt.runtime.serving.server import LocalTriton

    args.out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_dir(args.artifact, providers=["CPUExecutionProvider"], intra_op_threads=args.threads)
    t = time.perf_counter()
    pool = request_pool(pipe, args.images, args.max_new_tokens, plain_only=args.plain_only)
    print(f"{len(pool)} distinct requests, references from the local Pipeline in {time.perf_counter() - t:.1f} s")
    del pipe
    repo = write_repository(args.artifact, args.out / "repo", force=True, instances=args.instances,
                            intra_op_threads=args.threads, max_queue_delay_us=args.max_queue_delay_us,
                            max_batch_size=args.max_batch_size)
    server = LocalTriton(repo, http_port=free_port(), grpc_port=free_port(), log_file=args.out / "tritonserver.log")
    result: dict = {"artifact": str(args.artifact), "max_new_tokens": args.max_new_tokens, "instances": args.instances,
                    "threads": args.threads, "max_queue_delay_us": args.max_queue_delay_us,
                    "cpu_count": os.cpu_count(), "note": "shared machine: other sessions were running"}
    try:
        t = time.perf_counter()
        server.start()
        result["startup_s"] = round(time.perf_counter() - t, 2)
        host = server.http_url.removeprefix("http://")
        run_level(host, pool, 2, len(pool), args.max_seconds, args.max_new_tokens, args.request_timeout)  # warm-up
        result["rss_before_mb"] = rss_mb(server.process.pid)
        rows = []
        for clients in (int(c) for c in args.levels.split(",")):
            before = model_stats(server.http_url)
            row = run_level(host, pool, clients, args.requests, args.max_seconds, args.max_new_tokens,
                            args.request_timeout)
            after = model_stats(server.http_url)
            # requests per model execution: the dynamic batches Triton formed
            row["mean_batch"] = (after[0] - before[0]) / max(1, after[1] - before[1])
            row["rss_after_mb"] = rss_mb(server.process.pid)
            rows.append(row)
            print(f"clients {clients:3d}: {row['requests']} requests, {row['req_per_s']:.2f} req/s, p50 "
                  f"{row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, errors {row['errors']}, mismatches "
                  f"{row['mismatches']}, mean batch {row['mean_batch']:.2f}, server RSS {row['rss_after_mb']:.0f} MiB",
                  flush=True)
        result["rss_after_mb"] = rss_mb(server.process.pid)
        result["levels"] = rows
        inferences, executions = model_stats(server.http_url)
        result["triton_stats"] = {"inference_count": inferences, "execution_count": executions}
        if not args.no_faults:
            result["faults"] = faults(server, pool, args.max_new_tokens, args.request_timeout)
            print("faults:", json.dumps(result["faults"], indent=1))
    finally:
        server.stop()
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "table.md").write_text(table(result["levels"]) + "\n")
    plot(result["levels"], args.out / "latency.png")
    print(table(result["levels"]))
    print(f"memory (tritonserver + stubs, RSS): {result['rss_before_mb']:.0f} MiB after warm-up, "
          f"{result['rss_after_mb']:.0f} MiB after the load; results in {args.out}")
    ok = all(r["errors"] == 0 and r["mismatches"] == 0 and r["hung_threads"] == 0 for r in result["levels"])
    ok = ok and (args.no_faults or result["faults"]["ok"])
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def model_stats(http_url: str) -> tuple[int, int]:
    """(inference_count, execution_count) of the plain model (Triton's statistics extension)."""
    stats = json.loads(_get(f"{http_url}/v2/models/anchorrt/stats"))["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


if __name__ == "__main__":
    sys.exit(main())
