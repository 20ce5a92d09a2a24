"""The demo model needs no torch: a llama.cpp-only runtime (and Python 3.13, which has no CPU
torch build) builds it and runs it end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
ROOT = Path(__file__).resolve().parents[2]

# torch (and transformers) made unimportable in the child, as in a llama.cpp-only runtime
SCRIPT = """
import json, sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
from geochat_qgis.core.weights.demo import demo_model_dir
from geochat_qgis.cli import main
folder = demo_model_dir(sys.argv[1])
code = main(["detect", sys.argv[2], "--model", "tiny-demo", "--prompt", "car", "--grammar",
             "--gsd", "120", "-o", sys.argv[3], "--quiet"])
print(json.dumps({"code": code, "files": sorted(p.name for p in folder.iterdir())}))
"""


def test_the_demo_model_builds_and_answers_without_torch(tmp_path):
    out = tmp_path / "cars.gpkg"
    cache = tmp_path / "cache"
    env = {**os.environ, "GEOCHAT_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(DATA / "RGB.byte.tif"),
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["files"] == ["mmproj.gguf", "model.gguf"]
    assert report["code"] == 0
    import pyogrio

    assert len(pyogrio.read_dataframe(out)) > 0
