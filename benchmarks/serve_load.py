"""Load and soak figures for `mobilevlm serve` on a tiny model, over loopback only (docs/serving.md has a run).

    python benchmarks/serve_load.py [--clients 8 32 128] [--memory-budget-mb 1024]

Starts the server as its own process on 127.0.0.1, takes each request kind's solo answer, warms up, then for each
client count runs that many concurrent clients, each sending a bounded number of requests of a mix of kinds:
good (text, one small image), large (four plain-colour 4000x4000 PNGs, a few KB each on the wire), malformed
(broken JSON, text/plain, bad base64) and clients that disconnect after the first streamed piece. Prints one row
per client count: outcomes, latency of completed requests, the server's peak RSS above its RSS after warm-up, and
whether every completed answer equals its solo answer. Bounded: 1-3 requests a client, 120 s a request.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

MODEL = "tiny"
TIMEOUT_S = 120


def png(size, color) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(parts_or_text, max_tokens=8, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": parts_or_text}], "max_tokens": max_tokens,
            "temperature": 0, **fields}


def image_parts(text, *urls):
    return [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]


GOOD = {
    "text": chat("Where is the cat?"),
    "image": chat(image_parts("What is in the image?", png((64, 48), (200, 30, 30)))),
    "large": chat(image_parts("What colour is the square?", *[png((4000, 4000), c) for c in
                                                              ((255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9))])),
}
BAD = [(b'{"model": "tiny", "messages": [', "application/json"),
       (json.dumps(chat("Hello")).encode(), "text/plain"),
       (json.dumps(chat(image_parts("What?", "data:image/png;base64,@@@"))).encode(), "application/json")]
KINDS = ["text", "image", "large", "bad", "disconnect"]


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def answer_of(response: httpx.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


def one_request(url: str, kind: str, n: int, solo: dict) -> tuple[str, float]:
    """(outcome, seconds): completed / mismatch / 429 / 4xx / 5xx / disconnected / lost."""
    started = time.monotonic()
    try:
        with httpx.Client(timeout=TIMEOUT_S) as http:
            if kind == "bad":
                body, content_type = BAD[n % len(BAD)]
                response = http.post(url, content=body, headers={"Content-Type": content_type})
            elif kind == "disconnect":
                with http.stream("POST", url, json={**GOOD["text"], "max_tokens": 200, "stream": True}) as response:
                    if response.status_code == 200:
                        next(line for line in response.iter_lines() if '"content": "' in line
                             and '"content": ""' not in line)
                        return "disconnected", time.monotonic() - started
                    response.read()
            else:
                response = http.post(url, json=GOOD[kind])
    except (httpx.HTTPError, StopIteration):
        return "lost", time.monotonic() - started
    elapsed = time.monotonic() - started
    if response.status_code == 200:
        return ("completed" if answer_of(response) == solo[kind] else "mismatch"), elapsed
    if response.status_code == 429:
        return "429 " + response.json()["error"]["code"], elapsed
    return ("5xx" if response.status_code >= 500 else "4xx"), elapsed


def run_round(url: str, clients: int, per_client: int, solo: dict) -> list[tuple[str, str, float]]:
    def client(c):
        return [(kind, *one_request(url, kind, c + i, solo))
                for i in range(per_client) for kind in [KINDS[(c + i) % len(KINDS)]]]

    with ThreadPoolExecutor(clients) as pool:
        return [r for rows in pool.map(client, range(clients)) for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--memory-budget-mb", type=float, default=1024)
    parser.add_argument("--max-queue", type=int, default=16)
    args = parser.parse_args()
    from mobilevlm.testing import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_checkpoint(Path(tmp) / MODEL)
        # solo answers from a server of their own, so that the measured one has never decoded a large image
        with running_server(model, args) as (url, _):
            solo = {kind: answer_of(httpx.post(url, json=body, timeout=TIMEOUT_S)) for kind, body in GOOD.items()}
        with running_server(model, args) as (url, pid):
            for kind in ("text", "image", "text", "image"):  # warm-up: small requests only
                httpx.post(url, json=GOOD[kind], timeout=TIMEOUT_S)
            warm_kb = status_kb(pid, "VmRSS")
            print(f"# serve load: {machine()}, {datetime.date.today()}, Python {platform.python_version()}; tiny "
                  f"model, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, --max-queue {args.max_queue}, "
                  f"--memory-budget-mb {args.memory_budget_mb:g}, other settings default; RSS after warm-up "
                  f"{warm_kb / 1024:.0f} MiB\n")
            print("| clients | requests | completed | answers = solo | 429 (queue / memory) | 4xx | 5xx | "
                  "disconnected | lost | p50 / p95 latency (s) | peak RSS above warm-up (MiB) |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for clients in args.clients:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the RSS now
                rows = run_round(url, clients, 3 if clients <= 8 else 2 if clients <= 32 else 1, solo)
                print(table_row(clients, rows, status_kb(pid, "VmHWM") - warm_kb), flush=True)
                time.sleep(1)  # the disconnected streams' cancellations land before the next round
    return 0


def table_row(clients: int, rows: list[tuple[str, str, float]], peak_growth_kb: int) -> str:
    outcomes = [outcome for _, outcome, _ in rows]
    count = outcomes.count
    times = sorted(t for _, outcome, t in rows if outcome in ("completed", "mismatch"))
    done = count("completed") + count("mismatch")
    p50 = statistics.median(times) if times else float("nan")
    p95 = times[min(len(times) - 1, int(0.95 * len(times)))] if times else float("nan")
    good_429 = sum(1 for kind, o, _ in rows if kind in GOOD and o.startswith("429"))
    return (f"| {clients} | {len(rows)} | {done} | {'yes' if not count('mismatch') else 'NO'} "
            f"({count('completed')}/{done}) | {count('429 queue_full') + count('429 server_busy')} / "
            f"{count('429 memory_budget_full')} (good ones: {good_429}) | {count('4xx')} | {count('5xx')} | "
            f"{count('disconnected')} | {count('lost')} | {p50:.2f} / {p95:.2f} | {peak_growth_kb / 1024:.0f} |")


@contextmanager
def running_server(model: Path, args):
    """(chat completions URL, pid) of `mobilevlm serve` on a free loopback port, stopped on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    server = subprocess.Popen([sys.executable, "-m", "mobilevlm.cli", "serve", "--model", str(model), "--port",
                               str(port), "--max-queue", str(args.max_queue), "--memory-budget-mb",
                               str(args.memory_budget_mb)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(base + "/health").raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not come up")
                time.sleep(0.2)
        yield base + "/v1/chat/completions", server.pid
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
