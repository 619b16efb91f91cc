"""Server throughput with and without batching of queued jobs (server/batching.py).

    python benchmarks/bench_server_batch.py [--clients 8] [--requests 4] [--max-batch 1,4,8] [--steps 20]
                                            [--size 64] [--model FILE | --full] [--device cuda]

For each ``--max-batch`` value a fresh ``latentforge serve`` process is started on a free port (the demo
model, ``--model``, or with ``--full`` a random-weight SD1.5-shaped checkpoint written once to --workdir, run
at 512x512), warmed up with one request, then measured twice:

- one at a time: one client sends ``clients * requests`` requests one after another;
- concurrent: ``clients`` clients each send ``requests`` requests back to back (different prompts and
  seeds, the same size, steps and sampler: what batching can join).

Reports images/s of both, the mean batch the jobs ran in (the jobs API's ``batch`` field), and the
speed-up of concurrent over one-at-a-time. Results: a table on stdout and benchmarks/results/server_batch.json.
Timings depend on the machine's load: compare values from one run only.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import random_sd15, save, table

from serverproc import Server


class _Server(Server):
    """``latentforge serve`` (tests/serverproc.py) with the environment's threads and dtype, a queue that
    holds every client's requests, and the two calls the measurement makes."""

    def __init__(self, model: Path | None, max_batch: int, threads: int | None, device: str | None = None):
        args = ["--max-batch", str(max_batch), "--queue-size", "256", *(["-m", str(model)] if model else [])]
        args += ["--device", device] if device else []
        super().__init__(*args, env={"OMP_NUM_THREADS": str(threads)} if threads else {}, timeout=600)

    def txt2img(self, payload: dict) -> dict:
        r = self.post("/sdapi/v1/txt2img", json=payload, timeout=3600)
        r.raise_for_status()
        return r.json()

    def batch_of(self, job_id: str) -> int:
        return self.get(f"/latentforge/v1/jobs/{job_id}", timeout=60).json().get("batch", 1)


PROMPTS = ["a cat", "a red house by the sea", "a tree on a hill", "a dog", "mountains", "a boat", "a city", "fruit"]


def _payload(i: int, size: int, steps: int) -> dict:
    prompt = PROMPTS[i % len(PROMPTS)]
    return {"prompt": prompt, "seed": 1000 + i, "steps": steps, "width": size, "height": size, "sampler_name": "Euler"}


def measure(server: _Server, clients: int, per_client: int, size: int, steps: int) -> dict:
    server.txt2img(_payload(0, size, steps))  # warm-up
    n = clients * per_client
    t = time.perf_counter()
    for i in range(n):
        server.txt2img(_payload(i, size, steps))
    serial = n / (time.perf_counter() - t)
    infos: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            info = json.loads(server.txt2img(_payload(c * per_client + r, size, steps))["info"])
            with lock:
                infos.append(info)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    concurrent = n / (time.perf_counter() - t)
    batches = [server.batch_of(i["job_id"]) for i in infos]
    return {
        "one_at_a_time_img_s": serial,
        "concurrent_img_s": concurrent,
        "speedup": concurrent / serial,
        "mean_batch": sum(batches) / len(batches),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-batch", default="1,4,8", help="server --max-batch values to compare")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="image side (default 64 for the demo, 512 with --full)")
    ap.add_argument("--model", type=Path, help="a checkpoint (default: the bundled demo model)")
    ap.add_argument("--full", action="store_true", help="a random-weight SD1.5-shaped model at 512x512")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/latentforge-bench"))
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (default: the environment's)")
    ap.add_argument("--device", help="the server's torch device (default: the server's, cpu)")
    ap.add_argument("--out", type=Path, help="also write the results here (JSON)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the server is closed by ``finally``
    model = args.model
    if args.full:
        model = random_sd15(args.workdir, diffusers=False)[0]
    size = args.size or (512 if args.full else 64)
    rows = []
    for max_batch in [int(v) for v in args.max_batch.split(",")]:
        server = _Server(model, max_batch, args.threads, args.device)
        try:
            row = {"max_batch": max_batch, **measure(server, args.clients, args.requests, size, args.steps)}
        finally:
            server.close()
        rows.append(row)
        print(json.dumps(row), flush=True)
    columns = ["max_batch", "one_at_a_time_img_s", "concurrent_img_s", "speedup", "mean_batch"]
    print(table(rows, columns))
    name = "full-sd15" if args.full else str(model or "demo")
    payload = {"model": name, "size": size, "steps": args.steps, "clients": args.clients, "device": args.device}
    path = save("server_batch_full" if args.full else "server_batch", {**payload, "rows": rows})
    if args.out:
        args.out.write_text(json.dumps({**payload, "rows": rows}, indent=2) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
