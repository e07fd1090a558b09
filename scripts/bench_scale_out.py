#!/usr/bin/env python3
"""Throughput of the shared queue (pixart serve --queue + pixart worker) against
the in-process server, and the time for a dead worker's run to be taken over.

    scripts/bench_scale_out.py [--pixart target/release/pixart] [--runs 96] [--tiny-runs 200] [--workers 1,2,4]

Runs from the repository root (the workflows read models/pixart-shapes). Starts its
own redis-server on a free loopback port; everything it starts is stopped at the
end. Prints one JSON object per measurement and a Markdown table.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The queue's own cost per run: two nodes that take well under a millisecond.
TINY = """version: 1
name: tiny
params: {seed: 1}
nodes:
  noise: {type: noise.gaussian, inputs: {shape: [2, 3], seed: "${params.seed}"}}
  save: {type: tensor.save, inputs: {tensor: "${noise.tensor}", path: "t/n-${params.seed}.safetensors"}}
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port, method, path, body=None):
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if body is not None else None
    con.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = con.getresponse()
    text = r.read()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: {r.status} {text[:300]!r}")
    return json.loads(text)


def wait_port(port, limit=60):
    start = time.time()
    while time.time() - start < limit:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


class Stack:
    """Processes started for one measurement, stopped in reverse order."""

    def __init__(self):
        self.procs = []

    def start(self, *cmd):
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs = []


def start_redis(stack, folder):
    port = free_port()
    stack.start("redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", folder)
    wait_port(port)
    return f"redis://127.0.0.1:{port}/0"


def start_front(stack, pixart, out, queue=None):
    port = free_port()
    cmd = [pixart, "serve", "--port", str(port), "--out", out]
    if queue:
        cmd += ["--queue", queue]
    stack.start(*cmd)
    wait_port(port)
    return port


def start_workers(stack, pixart, queue, out, n, lease=30):
    return [stack.start(pixart, "worker", "--queue", queue, "--out", out, "--name", f"w{i}",
                        "--lease-secs", str(lease)) for i in range(n)]


def start_service(stack, args, folder, workers):
    """The in-process server (`workers` None), or Redis, a front end and
    `workers` workers, on a fresh output folder; the front end's port."""
    out = tempfile.mkdtemp(dir=folder)
    if workers is None:
        return start_front(stack, args.pixart, out)
    queue = start_redis(stack, out)
    port = start_front(stack, args.pixart, out, queue)
    start_workers(stack, args.pixart, queue, out, workers)
    return port


def submit_and_wait(port, requests):
    """Submits every request, waits for all to end; seconds from the first
    submit to the last end, and the records."""
    start = time.time()
    ids = [call(port, "POST", "/api/runs", r)["run_id"] for r in requests]
    pending = set(ids)
    records = {}
    while pending:
        time.sleep(0.05)
        for r in call(port, "GET", "/api/history"):
            if r["id"] in pending and r["state"] not in ("queued", "running"):
                pending.discard(r["id"])
                records[r["id"]] = r
    elapsed = time.time() - start
    failed = [r for r in records.values() if r["state"] != "finished"]
    if failed:
        raise RuntimeError(f"runs failed: {failed[:2]}")
    return elapsed, records


def txt2img_requests(n):
    text = open(os.path.join(REPO, "workflows/txt2img.yaml")).read()
    return [{"workflow": text, "params": {"seed": i}} for i in range(n)]


def tiny_requests(n):
    return [{"workflow": TINY, "params": {"seed": i}} for i in range(n)]


def throughput(args, folder, label, requests, workers):
    """Runs per minute: `workers` None is the in-process server."""
    stack = Stack()
    try:
        port = start_service(stack, args, folder, workers)
        # One run first: loads the model (cached per process) and warms up.
        submit_and_wait(port, requests[:max(1, workers or 1)])
        elapsed, _ = submit_and_wait(port, requests)
        result = {"measure": label, "workers": workers if workers is not None else "in-process",
                  "runs": len(requests), "seconds": round(elapsed, 2),
                  "runs_per_minute": round(60 * len(requests) / elapsed, 1),
                  "ms_per_run": round(1000 * elapsed / len(requests), 1)}
        print(json.dumps(result), flush=True)
        return result
    finally:
        stack.stop()


def latency(args, folder, workers, n=100):
    """Milliseconds from submit to end of a run that waits for nothing (one at a
    time, the tiny workflow), from the run records' own times: the queue's cost."""
    stack = Stack()
    try:
        port = start_service(stack, args, folder, workers)
        spans = []
        for i in range(n + 5):
            run = call(port, "POST", "/api/runs", {"workflow": TINY, "params": {"seed": i}})["run_id"]
            while True:
                r = call(port, "GET", f"/api/runs/{run}")
                if r["state"] not in ("queued", "running"):
                    break
                time.sleep(0.002)
            if i >= 5:  # the first few warm up
                spans.append(r["finished_at"] - r["submitted_at"])
        spans.sort()
        result = {"measure": "latency", "workers": workers if workers is not None else "in-process",
                  "runs": n, "median_ms": spans[len(spans) // 2], "p90_ms": spans[int(len(spans) * 0.9)]}
        print(json.dumps(result), flush=True)
        return result
    finally:
        stack.stop()


def takeover(args, folder, lease):
    """Seconds from a SIGKILL of the worker holding a run until another starts it."""
    stack = Stack()
    try:
        out = tempfile.mkdtemp(dir=folder)
        queue = start_redis(stack, out)
        port = start_front(stack, args.pixart, out, queue)
        workers = start_workers(stack, args.pixart, queue, out, 2, lease)
        text = open(os.path.join(REPO, "workflows/txt2img.yaml")).read()
        run = call(port, "POST", "/api/runs", {"workflow": text, "params": {"steps": 400}})["run_id"]
        while True:
            r = call(port, "GET", f"/api/runs/{run}")
            if r["state"] == "running":
                break
            time.sleep(0.05)
        time.sleep(1.0)
        holder = int(r["worker"][1:])
        killed = time.time()
        workers[holder].send_signal(signal.SIGKILL)
        while True:
            r = call(port, "GET", f"/api/runs/{run}")
            if r.get("attempts", 0) >= 2:
                break
            time.sleep(0.02)
        taken = r["started_at"] / 1000 - killed
        call(port, "POST", f"/api/runs/{run}/cancel")
        result = {"measure": "takeover", "lease_s": lease, "seconds": round(taken, 2)}
        print(json.dumps(result), flush=True)
        return result
    finally:
        stack.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pixart", default=os.path.join(REPO, "target/release/pixart"))
    ap.add_argument("--runs", type=int, default=96)
    ap.add_argument("--tiny-runs", type=int, default=200)
    ap.add_argument("--workers", default="1,2,4")
    args = ap.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        results.append(latency(args, folder, None))
        results.append(latency(args, folder, 1))
        results.append(throughput(args, folder, "tiny", tiny_requests(args.tiny_runs), None))
        results.append(throughput(args, folder, "tiny", tiny_requests(args.tiny_runs), 1))
        results.append(throughput(args, folder, "txt2img", txt2img_requests(args.runs), None))
        for n in counts:
            results.append(throughput(args, folder, "txt2img", txt2img_requests(args.runs), n))
        for lease in (3, 10):
            results.append(takeover(args, folder, lease))
    print()
    print("| measure | workers | runs | s | runs/min | ms/run |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if r["measure"] == "latency":
            print(f"| submit → end, one run at a time | {r['workers']} | {r['runs']} | "
                  f"median {r['median_ms']} ms, p90 {r['p90_ms']} ms | | |")
        elif r["measure"] == "takeover":
            print(f"| takeover (lease {r['lease_s']} s) | 2 | 1 | {r['seconds']} | | |")
        else:
            print(f"| {r['measure']} | {r['workers']} | {r['runs']} | {r['seconds']} | "
                  f"{r['runs_per_minute']} | {r['ms_per_run']} |")


if __name__ == "__main__":
    sys.exit(main())
