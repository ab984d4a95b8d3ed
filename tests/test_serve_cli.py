"""`mobilevlm serve` as a real process: binds 127.0.0.1 by default, needs its --api-key, answers, stops."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from mobilevlm.testing import make_tiny_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_serve_command(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "my-tiny-model")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOBILEVLM_API_KEY": "k3y"}
    process = subprocess.Popen([sys.executable, "-m", "mobilevlm.cli", "serve", "--model", str(model),
                                "--port", str(port), "--max-queue", "3"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                response = httpx.get(url + "/health", headers={"Authorization": "Bearer k3y"})
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert response.json()["model"] == "my-tiny-model" and response.json()["queue"]["limit"] == 3
        assert httpx.get(url + "/health").status_code == 401  # the key comes from $MOBILEVLM_API_KEY
        # on a loopback address only loopback names are served (no DNS rebinding)
        assert httpx.get(url + "/health", headers={"Authorization": "Bearer k3y", "Host": "rebound.example"}).status_code == 400
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        reply = client.chat.completions.create(model="my-tiny-model", max_tokens=3,
                                               messages=[{"role": "user", "content": "Hello"}])
        assert reply.choices[0].finish_reason in ("stop", "length")
        if shutil.which("ss"):  # bound to loopback only, by default
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
            assert listening.split()[3] == f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    assert process.returncode == 0
