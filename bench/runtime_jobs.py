"""Benchmark: a Job over the pipe (RuntimeClient -> runtime child) against run_job in process.

The project's tiny GeoChat GGUF runs the same refer Job on the same tiles of the demo raster
(tests/data/cogeo.tif, 504 px tiles, greedy, the box grammar) two ways in the same run:

- in process: ``run_job`` on a loaded llama.cpp backend, then ``export_detections`` to a
  GeoPackage (what a front end needs: a file to open);
- over the pipe: ``RuntimeClient.run`` (request JSON -> child builds the Job -> run_job on its
  cached model -> GeoPackage, progress and token events streamed back).

Passes alternate and the best of each counts. Prints wall and CPU seconds per tile for both
(CPU: this process plus the child; steadier on a shared machine) and the ratios (goal <=
1.05x), and the first answer after start: child start, model load and one question
(``RuntimeClient.ask`` on a fresh client) against the same in a fresh in-process Python. With
the tiny model a tile takes well under a second, so the ratio shows the pipe's cost at its most
visible.

    .venv/bin/python bench/runtime_jobs.py [--passes 3] [--tokens 24]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from geochat_qgis.client import RuntimeClient  # noqa: E402
from geochat_qgis.core.backends.factory import create_backend  # noqa: E402
from geochat_qgis.core.export import export_detections  # noqa: E402
from geochat_qgis.core.jobs import build_job  # noqa: E402
from geochat_qgis.core.pipeline import run_job  # noqa: E402
from geochat_qgis.core.weights.tiny import build_tiny_geochat  # noqa: E402

RASTER = ROOT / "tests" / "data" / "cogeo.tif"


def request_for(model: Path, output: Path, tokens: int) -> dict:
    return {"raster": str(RASTER), "task": "refer", "prompts": ["car"],
            "model": {"model_path": str(model)}, "tiling": {"overlap": 0},
            "output": {"path": str(output)},
            "options": {"max_new_tokens": tokens, "grammar": True}}


def child_cpu(client: RuntimeClient) -> float:
    times = psutil.Process(client.pid).cpu_times()
    return times.user + times.system


def in_process(backend, request: dict) -> tuple[float, float, int, float]:
    """(wall s, CPU s of this process, tiles, run_job's own s)."""
    started, cpu = time.perf_counter(), time.process_time()
    result = run_job(build_job(request), backend, on_token=lambda i, t: None)
    export_detections(result.detections, request["output"]["path"], result.crs)
    return (time.perf_counter() - started, time.process_time() - cpu, result.tiles_done,
            result.seconds)


def over_pipe(client: RuntimeClient, request: dict) -> tuple[float, float, int, float]:
    """(wall s, CPU s of this process and the child together, tiles, the child's run_job s)."""
    started, cpu, child = time.perf_counter(), time.process_time(), child_cpu(client)
    result = client.run(request, on_event=lambda event: None)
    assert result.complete, result.error
    spent = time.process_time() - cpu + child_cpu(client) - child
    return time.perf_counter() - started, spent, result.tiles_done, result.seconds


FIRST_ANSWER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from geochat_qgis.core.backends.factory import create_backend
from geochat_qgis.core.chat import ask
from geochat_qgis.core.jobs import backend_spec, build_chat
question = json.loads(sys.argv[2])
spec = backend_spec(question)
with create_backend(spec) as backend:
    ask(build_chat(question, spec), backend)
"""


def first_answers(model: Path, out: Path) -> tuple[float, float, float]:
    """(a fresh Python: imports, load, answer; the pipe's child start; a fresh client: child
    start, load, answer) in seconds."""
    question = {**request_for(model, out / "q.gpkg", 12), "task": "chat",
                "question": "what is here?"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", FIRST_ANSWER, str(ROOT), json.dumps(question)],
                   check=True, capture_output=True)
    local = time.perf_counter() - started
    client = RuntimeClient(python=sys.executable)
    try:
        started = time.perf_counter()
        client.ping()
        child_start = time.perf_counter() - started
        client.ask(question)
        remote = time.perf_counter() - started
    finally:
        client.close()
    return local, child_start, remote


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        model = build_tiny_geochat(out / "tiny", "gguf", seed=0)
        local_first, child_start, remote_first = first_answers(model, out)
        request = request_for(model, out / "local.gpkg", args.tokens)
        piped = {**request, "output": {"path": str(out / "pipe.gpkg")}}
        spec = build_job(request).backend
        client = RuntimeClient(python=sys.executable)
        local_runs, pipe_runs = [], []
        try:
            with create_backend(spec) as backend:
                in_process(backend, request)  # warm-up: both sides have the model loaded
                over_pipe(client, piped)
                for _ in range(args.passes):
                    local_runs.append(in_process(backend, request))
                    pipe_runs.append(over_pipe(client, piped))
        finally:
            client.close()
    tiles = local_runs[0][2]
    print(f"tiles: {tiles} x 504 px of {RASTER.name}, refer with the box grammar, "
          f"{args.tokens} new tokens at most (tiny GeoChat GGUF), best of {args.passes}")
    for what, index in (("wall", 0), ("CPU", 1)):
        local = min(run[index] for run in local_runs) / tiles
        pipe = min(run[index] for run in pipe_runs) / tiles
        print(f"{what}: in process (run_job + GeoPackage) {local * 1000:.1f} ms/tile, over the "
              f"pipe (RuntimeClient.run) {pipe * 1000:.1f} ms/tile, ratio {pipe / local:.3f}x "
              f"({(pipe - local) * 1000:+.1f} ms/tile)")
    # What each way adds around the same run_job (model time swings with the machine's load;
    # this part does not): the pipe's request, events, checkpoint, GeoPackage and answer.
    model = min(run[3] for run in local_runs) / tiles
    local_extra = min(run[0] - run[3] for run in local_runs) / tiles
    pipe_extra = min(run[0] - run[3] for run in pipe_runs) / tiles
    print(f"around run_job ({model * 1000:.1f} ms/tile): in process {local_extra * 1000:.2f} "
          f"ms/tile, over the pipe {pipe_extra * 1000:.2f} ms/tile; ratio at equal model time "
          f"{(model + pipe_extra) / (model + local_extra):.3f}x")
    print(f"first answer: a fresh in-process Python (start, imports, load, answer) "
          f"{local_first:.2f} s; a fresh client {remote_first:.2f} s (child start "
          f"{child_start:.2f} s, then imports, load, answer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
