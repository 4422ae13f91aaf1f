"""Load test for `bloodcell serve`: N concurrent clients x M single-image
requests to POST /api/predict on a server this script starts on loopback
(its own temporary database). Prints p50/p95 latency, throughput, errors.

    .venv/bin/python benchmarks/serve_load.py                 # bundled model (or --tiny)
    .venv/bin/python benchmarks/serve_load.py --tiny          # a small untrained cnn3 at 64 px
    .venv/bin/python benchmarks/serve_load.py --model runs/x  # any saved model

Bar (issue 6): zero errors and p95 < 500 ms with 50 clients x 20 requests.
Images are synthetic (360 px JPEGs, the size of PBC crops), never dataset images.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_jpegs(n: int, size: int = 360) -> list[bytes]:
    from conftest import synthetic_cell
    from PIL import Image
    out = []
    for i in range(n):
        b = io.BytesIO()
        Image.fromarray(synthetic_cell(i % 8, size, seed=i)).save(b, "JPEG", quality=90)
        out.append(b.getvalue())
    return out


def tiny_model(d: Path) -> Path:
    from conftest import CLASSES

    from bloodcell.models import create_model, save_model
    save_model(create_model("cnn3", 8, 64), {"architecture": "cnn3", "classes": CLASSES,
                                             "image_size": 64}, d)
    return d


def _multipart(img: bytes, name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f'Content-Type: image/jpeg\r\n\r\n').encode() + img + (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="sample"\r\n\r\n'
            f'load test\r\n--{boundary}--\r\n').encode()
    return body, f"multipart/form-data; boundary={boundary}"


def run_load(port: int, images: list[bytes], clients: int, requests: int, timeout: float):
    """Each client is a thread with one keep-alive connection (stdlib http.client:
    in this setting httpx's async pool, not the server, was the bottleneck)."""
    lat: list[float] = []
    run = uuid.uuid4().hex[:8]  # the warm-up and the measured run upload different bytes
    errors: list[str] = []
    start = threading.Barrier(clients)

    def client(k: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        # bytes after the JPEG end marker make every upload unique: the server stores each
        # one instead of answering "duplicate" (same image already in the sample)
        bodies = [_multipart(images[(k * requests + j) % len(images)] + f"#{run}-{k}-{j}".encode(),
                             f"c{k}_{j}.jpg") for j in range(requests)]
        start.wait()
        for body, ctype in bodies:
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/api/predict", body=body, headers={"Content-Type": ctype})
                r = conn.getresponse()
                data = r.read()
                if r.status != 200 or json.loads(data)["results"][0]["status"] != "ok":
                    errors.append(f"HTTP {r.status}: {data[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            lat.append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.array(lat), errors, time.perf_counter() - t0


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) the server process has used: its cost per request,
    a figure that, unlike latency, does not depend on what else runs on the box."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model path (default: the bundled model; --tiny if none)")
    ap.add_argument("--tiny", action="store_true", help="a small untrained cnn3 at 64 px")
    ap.add_argument("--no-screen", action="store_true", help="serve without the multi-cell screen")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args(argv)
    a.clients = max(1, min(a.clients, 200))  # bounded: this is a local check, not a stress tool
    a.requests = max(1, min(a.requests, 200))

    with tempfile.TemporaryDirectory(prefix="bloodcell-load-") as td:
        td = Path(td)
        model = a.model
        if model is None and not a.tiny:
            from bloodcell.modelfile import BUNDLED_DIR
            if not (BUNDLED_DIR / "model.json").exists():
                print("no bundled model: using --tiny")
                a.tiny = True
        if a.tiny:
            model = str(tiny_model(td / "model"))
        port = free_port()
        cmd = [sys.executable, "-m", "bloodcell.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--db", str(td / "load.sqlite3")] + (["--model", model] if model else []) + (
               ["--no-screen"] if a.no_screen else [])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # the server log goes to a file: an unread pipe fills up and stalls the server
        log_file = open(td / "server.log", "w")
        server = subprocess.Popen(cmd + ["--log-level", "warning"], stdout=log_file,
                                  stderr=subprocess.STDOUT, env=env, text=True)
        try:
            import httpx
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 120
            while True:
                if server.poll() is not None:
                    sys.exit(f"server exited: {(td / 'server.log').read_text()[-2000:]}")
                try:
                    health = httpx.get(url + "/api/health", timeout=2).json()
                    break
                except httpx.HTTPError:
                    if time.time() > deadline:
                        sys.exit("server did not start within 120 s")
                    time.sleep(0.3)
            images = synthetic_jpegs(64)
            run_load(port, images, 4, 5, a.timeout)  # warm-up (first-call overheads)
            cpu0 = _cpu_seconds(server.pid)
            lat, errors, wall = run_load(port, images, a.clients, a.requests, a.timeout)
            cpu1 = _cpu_seconds(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
            log_file.close()

    n = len(lat)
    ms = lat * 1000
    res = {"model": health["model"], "model_version": health["model_version"], "clients": a.clients,
           "requests_per_client": a.requests, "requests": n, "errors": len(errors),
           "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
           "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
           "throughput_rps": n / wall, "wall_s": wall, "cpu_count": os.cpu_count(),
           "server_cpu_ms_per_request": (cpu1 - cpu0) / n * 1000 if cpu0 is not None and cpu1 is not None else None,
           "load_average_1min": os.getloadavg()[0]}
    res["multi_cell_screen"] = health["multi_cell_screen"]
    print(f"model {res['model']} ({res['model_version']}), multi-cell screen "
          f"{'on' if health['multi_cell_screen'] else 'off'}, {a.clients} clients x {a.requests} requests "
          f"= {n}, one 360 px JPEG each, loopback, {os.cpu_count()} CPU cores")
    print(f"latency p50 {res['p50_ms']:.0f} ms  p95 {res['p95_ms']:.0f} ms  p99 {res['p99_ms']:.0f} ms  "
          f"max {res['max_ms']:.0f} ms")
    print(f"throughput {res['throughput_rps']:.1f} requests/s over {wall:.1f} s; errors {len(errors)}")
    if res["server_cpu_ms_per_request"] is not None:
        print(f"server CPU {res['server_cpu_ms_per_request']:.1f} ms per request "
              f"(all threads; the load clients run in this process, outside that figure)")
    for e in errors[:5]:
        print("  error:", e)
    ok = not errors and res["p95_ms"] < 500
    print(f"bar (zero errors, p95 < 500 ms): {'PASS' if ok else 'FAIL'}  "
          f"(1-min load average at the end {res['load_average_1min']:.1f}: other jobs share these cores)")
    if a.json:
        from bloodcell.data import atomic_write_json
        atomic_write_json(Path(a.json), res)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
