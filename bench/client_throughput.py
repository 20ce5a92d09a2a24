"""Benchmark: how fast the plugin's OpenAI client prepares and sends tiles, against the minimum.

A GPU cluster behind one URL answers hundreds of tiles a second; the client must never be what
limits it. A loopback server (its own process) answers every chat request at once with a fixed
completion, so only the client's work is timed. Modes, in one run, on the same 504 px tiles
(read once from a generated imagery-like raster):

- ``encode``: the tiles only PNG-encoded, base64'd and put into a request JSON, in a loop (the
  issue's baseline: the work no client can skip, without any HTTP);
- ``raw``: the openai-style minimum over HTTP: base64 of a PNG encoded beforehand + JSON + POST
  (urllib, ``N`` threads);
- ``backend``: :class:`OpenAIHttpBackend` with ``max_in_flight=N`` (GeoChat's pad/resize check,
  PNG encode, base64, JSON, HTTP, answer parsing), batches of ``N`` tiles as run_job sends them;
- ``job``: ``run_job`` over the raster (tiling reads, the backend, parsing, georeferencing).

Reported per mode and ``N``: tiles/s (wall), the client's CPU ms per tile (this process, all
threads) and the ratio to ``encode``. Goals (issue 23): backend >= 0.9 of encode, >= 100
tiles/s at 16 in flight on the 2-core machine, or the figures say what limits it.

    .venv/bin/python bench/client_throughput.py [--tiles 96] [--in-flight 1,4,16,64] [--repeat 2]
"""
from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
sys.path.insert(0, str(ROOT))

from geochat_qgis.core.backends.base import Conversation, GenerateOptions  # noqa: E402
from geochat_qgis.core.backends.images import png_bytes  # noqa: E402
from geochat_qgis.core.backends.messages import chat_messages  # noqa: E402
from geochat_qgis.core.backends.openai_http import HttpSettings, OpenAIHttpBackend  # noqa: E402

ANSWER = json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": {
    "role": "assistant", "content": "<p>car</p> {<10><10><40><40>|<0>}"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1415, "completion_tokens": 12}}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "geochat"}]}).encode()
QUESTION = "[refer] Give me the location of <p> car </p>"
SIZE = 504


class _Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send(MODELS)

    def do_POST(self) -> None:  # noqa: N802
        remaining = int(self.headers.get("Content-Length", 0))
        while remaining:  # read the body (as a server must), do nothing with it
            remaining -= len(self.rfile.read(min(remaining, 1 << 20)))
        self._send(ANSWER)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: 64 connections at once, none reset


def _serve(port, ready) -> None:
    server = _Server(("127.0.0.1", 0), _Answer)
    port.value = server.server_address[1]
    ready.set()
    server.serve_forever()


def start_server() -> tuple[multiprocessing.Process, str]:
    port, ready = multiprocessing.Value("i", 0), multiprocessing.Event()
    process = multiprocessing.Process(target=_serve, args=(port, ready), daemon=True)
    process.start()
    ready.wait(30)
    return process, f"http://127.0.0.1:{port.value}/v1"


def raster(tiles: int) -> Path:
    """An imagery-like raster of about ``tiles`` 504 px tiles (bench/tiling.py's generator)."""
    from tiling import make_raster

    side = SIZE * max(1, round(tiles ** 0.5))
    path = CACHE / f"client_throughput_{side}.tif"
    if not path.exists():
        CACHE.mkdir(exist_ok=True)
        make_raster(path, side)
    return path


def read_tiles(path: Path, count: int) -> list:
    from geochat_qgis.core.tiling import TileSpec, plan_tiles
    try:
        from geochat_qgis.core.tile_reading import iter_tiles
    except ImportError:  # before the tiler's split into tiling.py and tile_reading.py
        from geochat_qgis.core.tiling import iter_tiles

    plan = plan_tiles(str(path), TileSpec(tile_size=SIZE, overlap=0))
    return [tile.image for _, tile in zip(range(count), iter_tiles(plan))]


def _body(uri: str) -> bytes:
    return json.dumps({"model": "geochat", "messages": chat_messages(Conversation.single(QUESTION), uri),
                       "max_tokens": 256, "temperature": 0.0, "stream": False}).encode()


def mode_encode(images, url, n) -> None:
    for image in images:
        _body("data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii"))


def mode_raw(images, url, n, pngs=None) -> None:
    def send(png: bytes) -> None:
        body = _body("data:image/png;base64," + base64.b64encode(png).decode("ascii"))
        request = urllib.request.Request(url + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            json.loads(answer.read())

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(send, pngs))


def mode_backend(images, url, n) -> None:
    backend = OpenAIHttpBackend("geochat", settings=HttpSettings(base_url=url, max_in_flight=n))
    with backend:
        for start in range(0, len(images), n):
            backend.generate(images[start:start + n], Conversation.single(QUESTION),
                             GenerateOptions())


def mode_job(path: Path, url: str, n: int, tiles: int) -> int:
    from geochat_qgis.core.pipeline import Job, run_job
    from geochat_qgis.core.tiling import TileSpec

    backend = OpenAIHttpBackend("geochat", settings=HttpSettings(base_url=url, max_in_flight=n))
    with backend:
        result = run_job(Job(raster=str(path), prompts=["car"],
                             tile_spec=TileSpec(tile_size=SIZE, overlap=0)), backend)
    assert result.complete and result.tiles_done == result.tiles_planned, result.error
    return result.tiles_done


def timed(work, count: int) -> tuple[float, float]:
    """(tiles/s, client CPU ms per tile) of ``work()`` over ``count`` tiles."""
    wall, cpu = time.perf_counter(), time.process_time()
    done = work() or count
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return done / wall, 1000 * cpu / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=96)
    parser.add_argument("--in-flight", default="1,4,16,64")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    path = raster(args.tiles)
    images = read_tiles(path, args.tiles)
    pngs = [png_bytes(image) for image in images]
    process, url = start_server()
    print(f"{len(images)} tiles of {SIZE} px from {path.name}; PNG {sum(map(len, pngs)) / len(pngs) / 1024:.0f} "
          f"KiB a tile (base64: x4/3); server {url}")
    try:
        best: dict = {}
        for _ in range(args.repeat):  # modes alternate; the best pass of each counts
            rate = timed(lambda: mode_encode(images, url, 1), len(images))
            best[("encode", 1)] = max(best.get(("encode", 1), (0, 0)), rate)
            for n in map(int, args.in_flight.split(",")):
                for mode, work in (("raw", lambda n=n: mode_raw(images, url, n, pngs)),
                                   ("backend", lambda n=n: mode_backend(images, url, n)),
                                   ("job", lambda n=n: mode_job(path, url, n, args.tiles))):
                    rate = timed(work, len(images))
                    best[(mode, n)] = max(best.get((mode, n), (0, 0)), rate)
    finally:
        process.terminate()
    base = best[("encode", 1)][0]
    print("| mode | in flight | tiles/s | client CPU ms/tile | / encode |")
    print("|---|---:|---:|---:|---:|")
    for (mode, n), (rate, cpu) in best.items():
        print(f"| {mode} | {n} | {rate:.1f} | {cpu:.1f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
