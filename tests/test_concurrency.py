"""One Pipeline shared by 8 threads (the policy in runtime/pipeline.py: thread-safe) gives, for every request, the
tokens a serial run gives: no KV cache, binding, flag array, random generator or VisAlign state is shared between
calls. Requests mix prompts, images, greedy and seeded sampling, CLVA / SEVI / IAVA flags and batch sizes, so a
leak of any of them into a neighbour shows up as a different token."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from anchorrt.runtime.pipeline import Pipeline, Request

THREADS = 8


def jobs(images) -> list[dict]:
    prompts = ["What is in the image?", "Is there a dog?", "Describe the colours.", "Count the objects."]
    flags = [None, {"clva": {"alpha": 20}}, {"sevi": {"omega": 1.0}}, {"clva": True, "sevi": True},
             {"iava": {"alpha": 1.0, "i": 0.25}}]
    out = []
    for k in range(24):
        sampling = {"max_new_tokens": 6 + k % 3}
        if k % 2:
            sampling.update(do_sample=True, temperature=0.9, top_p=0.95, seed=k)
        if k % 5 == 4:  # a batch of two requests with different flags
            reqs = [Request(images[k % 3], prompts[k % 4], flags[k % 4]),
                    Request(images[(k + 1) % 3], prompts[(k + 1) % 4], flags[(k + 2) % 4])]
        else:
            reqs = [Request(images[k % 3], prompts[k % 4], flags[k % 5])]
        out.append({"requests": reqs, "sampling": sampling})
    return out


def run(pipe: Pipeline, job: dict) -> list[list[int]]:
    return [g.token_ids for g in pipe.generate_batch(job["requests"], **job["sampling"])]


def test_eight_threads_match_serial(baked_artifact, images):
    work = jobs(images)
    serial_pipe = Pipeline.from_dir(baked_artifact)
    expected = [run(serial_pipe, job) for job in work]
    assert len({str(e) for e in expected}) > 5  # the jobs really differ, so a mix-up cannot go unseen

    pipe = Pipeline.from_dir(baked_artifact)  # fresh: its sessions are first built by racing threads
    start = threading.Barrier(THREADS)
    seen_threads = set()

    def worker(index: int) -> list:
        start.wait()
        results = []
        for j in range(index, len(work), THREADS):
            seen_threads.add(threading.get_ident())
            results.append((j, run(pipe, work[j])))
        return results

    with ThreadPoolExecutor(THREADS) as pool:
        got = dict(item for part in pool.map(worker, range(THREADS)) for item in part)
    assert len(seen_threads) == THREADS
    mismatched = [j for j in range(len(work)) if got[j] != expected[j]]
    assert not mismatched, f"jobs {mismatched} differ from their serial run"


def test_sessions_are_built_once_under_contention(baked_artifact):
    pipe = Pipeline.from_dir(baked_artifact)
    start = threading.Barrier(THREADS)

    def session(_):
        start.wait()
        return id(pipe.decoder.session)

    with ThreadPoolExecutor(THREADS) as pool:
        ids = set(pool.map(session, range(THREADS)))
    assert len(ids) == 1
