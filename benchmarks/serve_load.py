"""Load on `python -m ctl_jax.serve` from a bounded client on 127.0.0.1: requests/s and
latency of `POST /search` at several numbers of concurrent clients, with dynamic batching
on (`--max_batch`) and off (`--max_batch=1`), then the service's memory under a stream of
maximum-size uploads.

For each model (a randomly initialised ResNet at the given input size, saved as a
checkpoint; the index holds synthetic vectors) the service is started as a subprocess, each
query image is first searched alone (the reference answer), then `clients` threads, each
with its own keep-alive connection, post query images for `--seconds` seconds. Every answer
is compared with the reference (same matches in the same order, scores within 1e-4):
`wrong_answers` counts those that differ, `connection_errors` the requests that failed at
the socket level (reset, refused, closed), `errors` the other non-200 answers.
`mean_batch` is the service's own count (its /metrics) of images per model call.

Uploads: `--upload_clients` threads post noise PNGs just under `--max_upload_mb` (plus
over-limit declared sizes and a 12000 x 12000 header, both refused) for `--upload_seconds`;
the service's resident memory (VmRSS) is sampled every 0.2 s.

  python -m benchmarks.serve_load            # ResNet-18 64x32 and ResNet-50 256x128, 1/8/32/64
                                             # clients, 30 s each (~15 min on 2 cores)
  python -m benchmarks.serve_load --small    # a quick check (about two minutes)

Prints one JSON object. The client shares the machine with the service: on 2 cores its
threads take CPU the service could use, so the figures are a floor.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import io
import json
import os
import re
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import numpy as np

try:
    from . import common
except ImportError:  # run as a file: benchmarks/ is on sys.path
    import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        default="resnet18:64x32,resnet50:256x128",
        help="arch:HEIGHTxWIDTH, comma-separated",
    )
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=30.0, help="per measurement")
    parser.add_argument("--max_batch", type=int, default=32)
    parser.add_argument("--batch_wait_ms", type=float, default=5.0)
    parser.add_argument("--gallery", type=int, default=2000, help="index items")
    parser.add_argument("--queries", type=int, default=16, help="distinct query images")
    parser.add_argument("--upload_clients", type=int, default=8)
    parser.add_argument("--upload_seconds", type=float, default=30.0)
    parser.add_argument("--max_upload_mb", type=float, default=16.0)
    parser.add_argument("--small", action="store_true", help="a quick check")
    args = parser.parse_args(argv)
    if args.small:
        args.cases, args.clients, args.seconds = "resnet18:64x32", "1,8", 4.0
        args.gallery, args.upload_seconds, args.max_upload_mb = 200, 5.0, 2.0
    return args


def save_model(directory: str, arch: str, height: int, width: int) -> int:
    """A randomly initialised model saved as a checkpoint; returns its embedding width."""
    import jax

    from ctl_jax import configs
    from ctl_jax.build import build_model
    from ctl_jax.checkpoints import CheckpointStore
    from ctl_jax.models.reid import feature_dim, init_variables

    config = configs.load_config(os.path.join(common.ROOT, "configs", "default.py"))
    config.model.arch = arch
    config.data.height, config.data.width = height, width
    model = build_model(config, 10)
    variables = init_variables(model, jax.random.key(0), (height, width, 3))
    store = CheckpointStore(directory)
    meta = {"config": json.loads(configs.config_to_json(config)), "num_classes": 10}
    store.save(0, dict(variables), {"epoch": 0}, meta)
    store.close()
    return feature_dim(arch)


def save_index(path: str, items: int, dim: int) -> None:
    """An instance index of random unit vectors, 10 per identity."""
    from ctl_jax.retrieval.embedding_file import Embeddings
    from ctl_jax.retrieval.labels import pids_for_labels
    from ctl_jax.retrieval.updatable_index import Index

    rng = np.random.default_rng(0)
    labels = np.asarray([f"id{i // 10}" for i in range(items)])
    vectors = rng.standard_normal((items, dim)).astype(np.float32)
    embeddings = Embeddings(
        vectors, pids_for_labels(labels), np.full(items, -1, np.int64), np.full(items, ""), labels
    )
    Index.build(embeddings, kind="instance").save(path, overwrite=True)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="png", compress_level=1)
    return out.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A PNG header declaring width x height, with almost no pixel data."""
    chunk = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + chunk + struct.pack(">I", zlib.crc32(b"IHDR" + chunk))
    data = zlib.compress(b"\0" * 64)
    idat = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(data))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat


class Service:
    """`python -m ctl_jax.serve` in a subprocess; `port`, `pid`, `rss_mb()`."""

    def __init__(self, index, model, *flags):
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ctl_jax.serve",
                f"--index={index}",
                f"--checkpoint={model}",
                "--port=0",
                "--nolog",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=common.ROOT,
        )
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if select.select([self.process.stdout], [], [], 1.0)[0]:
                line = self.process.stdout.readline()
                found = re.search(r"on http://127\.0\.0\.1:(\d+)$", line.strip())
                if found:
                    self.port = int(found.group(1))
                    return
                if not line:
                    break
        self.process.kill()
        raise RuntimeError("the service did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def metric(self, name: str) -> float:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        connection.close()
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else float("nan")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def post(connection, body: bytes, route="/search", content_type="image/png"):
    connection.request("POST", route, body, {"Content-Type": content_type})
    response = connection.getresponse()
    return response.status, response.read()


def matches(body: bytes):
    found = json.loads(body)["queries"][0]["matches"]
    return [m["label"] for m in found], np.asarray([m["score"] for m in found])


def load(port: int, queries: list[bytes], want: list, clients: int, seconds: float) -> dict:
    """`clients` threads posting queries for `seconds`; counts and latency percentiles."""
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()
    counts = {"requests": 0, "connection_errors": 0, "errors": 0, "wrong_answers": 0}
    latencies = []

    def client(number):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i, mine = number, []
        local = dict.fromkeys(counts, 0)
        while time.monotonic() < stop_at:
            q = i % len(queries)
            i += 1
            start = time.perf_counter()
            try:
                status, body = post(connection, queries[q])
            except (OSError, http.client.HTTPException):
                local["connection_errors"] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            mine.append(time.perf_counter() - start)
            local["requests"] += 1
            if status != 200:
                local["errors"] += 1
                continue
            labels, scores = matches(body)
            if labels != want[q][0] or not np.allclose(scores, want[q][1], atol=1e-4):
                local["wrong_answers"] += 1
        connection.close()
        with lock:
            latencies.extend(mine)
            for key, value in local.items():
                counts[key] += value

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.monotonic() - started
    latencies.sort()
    pick = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)
    return {
        **counts,
        "seconds": round(elapsed, 1),
        "requests_per_second": round(counts["requests"] / elapsed, 1),
        "p50_ms": pick(0.5) if latencies else None,
        "p99_ms": pick(0.99) if latencies else None,
        "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None,
    }


def run_case(args, tmp, arch, height, width) -> list[dict]:
    model = os.path.join(tmp, f"{arch}_{height}x{width}")
    dim = save_model(model, arch, height, width)
    index = os.path.join(tmp, f"index_{dim}.npz")
    save_index(index, args.gallery, dim)
    rng = np.random.default_rng(1)
    # Query photos at twice the model's input size: decoding and resizing are part of it.
    queries = [
        png(rng.integers(0, 256, (2 * height, 2 * width, 3), np.uint8)) for _ in range(args.queries)
    ]
    rows = []
    for batching, max_batch in (("on", args.max_batch), ("off", 1)):
        service = Service(
            index,
            model,
            f"--max_batch={max_batch}",
            f"--batch_wait_ms={args.batch_wait_ms}",
            "--max_in_flight=4096",
            "--top_k=10",
            "--read_only",
        )
        try:
            connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=120)
            want = [matches(post(connection, q)[1]) for q in queries]
            connection.close()
            for clients in [int(c) for c in args.clients.split(",")]:
                load(service.port, queries, want, clients, min(2.0, args.seconds))  # warm
                calls = service.metric("ctl_jax_batch_size_count")
                images = service.metric("ctl_jax_batch_size_sum")
                row = load(service.port, queries, want, clients, args.seconds)
                calls = service.metric("ctl_jax_batch_size_count") - calls
                images = service.metric("ctl_jax_batch_size_sum") - images
                row = {
                    "arch": arch,
                    "height": height,
                    "width": width,
                    "batching": batching,
                    "max_batch": max_batch,
                    "clients": clients,
                    **row,
                    "mean_batch": round(images / calls, 2) if calls else None,
                }
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
        finally:
            service.stop()
    return rows


def uploads(args, tmp) -> dict:
    """Resident memory of the service under a stream of maximum-size uploads."""
    model = os.path.join(tmp, "resnet18_64x32")
    if not os.path.isdir(model):
        save_model(model, "resnet18", 64, 32)
    index = os.path.join(tmp, "index_512.npz")
    if not os.path.isfile(index):
        save_index(index, args.gallery, 512)
    limit = int(args.max_upload_mb * 1024 * 1024)
    side = int((limit / 3) ** 0.5 * 0.97)  # a noise PNG barely compresses: ~3 bytes a pixel
    big = png(np.random.default_rng(2).integers(0, 256, (side, side, 3), np.uint8))
    assert len(big) <= limit, (len(big), limit)
    bomb = declared_png(12000, 12000)
    service = Service(index, model, f"--max_upload_mb={args.max_upload_mb}", "--read_only")
    samples, statuses = [], {}
    stop_at = time.monotonic() + args.upload_seconds
    lock = threading.Lock()

    def client(number):
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=120)
        i = number
        while time.monotonic() < stop_at:
            i += 1
            kind = ("big", "bomb", "over")[0 if i % 4 else (i // 4) % 2 + 1]
            try:
                if kind == "over":  # a declared size over the limit, no body sent
                    connection.putrequest("POST", "/search")
                    connection.putheader("Content-Type", "image/png")
                    connection.putheader("Content-Length", str(limit * 4))
                    connection.endheaders()
                    response = connection.getresponse()
                    status = response.status
                    response.read()
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=120)
                else:
                    status, _ = post(connection, big if kind == "big" else bomb)
            except (OSError, http.client.HTTPException):
                status = "connection_error"
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=120)
            with lock:
                key = f"{kind}:{status}"
                statuses[key] = statuses.get(key, 0) + 1
        connection.close()

    try:
        start_mb = service.rss_mb()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.upload_clients)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            samples.append(service.rss_mb())
            time.sleep(0.2)
        for thread in threads:
            thread.join()
    finally:
        service.stop()
    quarter = max(1, len(samples) // 4)
    return {
        "upload_bytes": len(big),
        "upload_pixels": side * side,
        "clients": args.upload_clients,
        "seconds": args.upload_seconds,
        "answers": dict(sorted(statuses.items())),
        "rss_start_mb": round(start_mb, 1),
        "rss_peak_mb_by_quarter": [
            round(max(samples[i : i + quarter]), 1) for i in range(0, len(samples), quarter)
        ][:4],
        "rss_peak_mb": round(max(samples), 1),
        "rss_end_mb": round(samples[-1], 1),
    }


def main(argv=None):
    args = parse_args(argv)
    record = common.machine_record("serve_load", os.cpu_count(), 1)
    record.update(
        {
            "seconds": args.seconds,
            "max_batch": args.max_batch,
            "batch_wait_ms": args.batch_wait_ms,
            "gallery": args.gallery,
        }
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        for case in args.cases.split(","):
            arch, size = case.split(":")
            height, width = (int(v) for v in size.split("x"))
            rows.extend(run_case(args, tmp, arch, height, width))
        record["search"] = rows
        record["uploads"] = uploads(args, tmp) if args.upload_seconds > 0 else None
    speedups = {}
    for row in rows:
        if row["batching"] == "on":
            off = next(
                (
                    r
                    for r in rows
                    if r["batching"] == "off"
                    and r["arch"] == row["arch"]
                    and r["clients"] == row["clients"]
                    and r["height"] == row["height"]
                ),
                None,
            )
            if off and off["requests_per_second"]:
                key = f"{row['arch']}_{row['height']}x{row['width']}_{row['clients']}_clients"
                speedups[key] = round(row["requests_per_second"] / off["requests_per_second"], 2)
    record["batching_speedup"] = speedups
    record["loadavg_end"] = common.loadavg()
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
