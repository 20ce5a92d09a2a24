"""A real vLLM OpenAI server (its CPU build) on 127.0.0.1 for the vllm tier: started from the Python
that GEOCHAT_VLLM_PYTHON names, offline, its log in a file the failures point at."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Sequence

VLLM_PYTHON_ENV = "GEOCHAT_VLLM_PYTHON"
MODEL_NAME = "geochat-tiny"
START_SECONDS = 900  # vLLM's CPU build starts in ~2 min on 2 busy cores


def vllm_python() -> str:
    """The Python with vLLM, or '' (the tier is skipped with the reason)."""
    python = os.environ.get(VLLM_PYTHON_ENV, "")
    return python if python and Path(python).exists() else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(python: str, folder: Path, port: int, extra: Sequence[str] = ()) -> list[str]:
    """How the tier starts vLLM: the converted folder as it is, GeoChat's context, float32 on a
    CPU, automatic prefix caching, transformers' PIL image processor (not torchvision's), as
    models/geochat-7b.md tells a GPU server."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "2048", "--dtype", "float32", "--enable-prefix-caching",
            "--mm-processor-kwargs", '{"backend": "pil"}', *extra]


class VllmServer:
    """vLLM serving ``folder`` until :meth:`stop`; :attr:`url` is its /v1."""

    def __init__(self, folder: Path, log: Path, extra: Sequence[str] = ()) -> None:
        self.port, self.log_path = free_port(), log
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)
        self.log = open(log, "wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(serve_command(vllm_python(), folder, self.port, extra),
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        while not self._up():
            if self.process.poll() is not None or time.monotonic() > self.started + START_SECONDS:
                self.stop()
                raise RuntimeError(f"vLLM did not start: {self.tail()}")
            time.sleep(1.0)
        self.start_seconds = time.monotonic() - self.started

    def _up(self) -> bool:
        """Whether the server lists its models yet."""
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=2) as response:
                self.models = json.load(response)
            return True
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metric(self, name: str) -> float:
        """A counter from /metrics (summed over its labels)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(m) for m in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M))

    def chat(self, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}/chat/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.load(response)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)  # the API server and its engine process
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=30)
        self.log.close()
