"""The dependency installer: a real venv, real pip against PyPI, imports in a fresh process."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from geochat_qgis.cli import main
from geochat_qgis.core.backends.base import CancelToken
from geochat_qgis.core.deps import DepsError
from geochat_qgis.core.deps.diagnostics import diagnostics_text, record_error, redact
from geochat_qgis.core.deps.environment import ManagedEnv, find_base_python, platform_tag
from geochat_qgis.core.deps.gpu import nvidia_gpus
from geochat_qgis.core.deps.pip import install_backend, install_packages, probe_imports
from geochat_qgis.core.deps.requirements import BackendRequirements, PipStep, core_step, requirements_for
from geochat_qgis.core.errors import Cancelled

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> ManagedEnv:
    managed = ManagedEnv(tmp_path_factory.mktemp("deps") / f"venv-{platform_tag()}")
    managed.create()
    return managed


def test_environment_matches_this_python_and_is_reused(env):
    assert env.exists and env.stamp()["platform"] == platform_tag()
    assert env.isolated  # QGIS's site packages are not visible in the runtime's environment
    assert not probe_imports(env.python, ["qgis"])[0].ok
    assert Path(find_base_python()).name.startswith("python")
    before = env.python.stat().st_mtime_ns
    env.create()  # second call: reused, not rebuilt
    assert env.python.stat().st_mtime_ns == before


def test_installs_a_real_package_and_verifies_it_in_a_fresh_process(env):
    lines: list[str] = []
    assert not probe_imports(env.python, ["tomli_w"])[0].ok
    install_packages(env, PipStep(("tomli-w",)), on_line=lines.append)
    check = probe_imports(env.python, ["tomli_w"])[0]
    assert check.ok and check.version
    assert Path(check.file).is_relative_to(env.path)  # inside the managed env, nowhere else
    assert any("tomli" in line.lower() for line in lines)  # pip's live output came through
    assert "tomli-w" in env.log_path.read_text()


def test_install_backend_installs_every_step_then_verifies_the_imports(env):
    demo = BackendRequirements("demo", "cpu", (PipStep(("tomli-w",)),), ("tomli_w", "json"), 1)
    lines: list[str] = []
    checks = install_backend(env, demo, on_line=lines.append)
    assert [c.module for c in checks if c.ok] == ["tomli_w", "json"]
    assert lines[-1].startswith("Verifying: import tomli_w, json in a fresh process")
    broken = BackendRequirements("demo", "cpu", (PipStep(("tomli-w",)),), ("tomli_w_typo",), 1)
    with pytest.raises(DepsError, match="installed but does not import: tomli_w_typo"):
        install_backend(env, broken)


def test_missing_package_reports_pips_error(env):
    with pytest.raises(DepsError, match="pip failed.*(No matching distribution|Could not find)"):
        install_packages(env, PipStep(("geochat-qgis-no-such-package-zz9",)))


def test_cancel_stops_pip(env):
    token = CancelToken()
    with pytest.raises(Cancelled):
        install_packages(env, PipStep(("geochat-qgis-no-such-package-zz8",)),
                         on_line=lambda line: token.cancel(), cancel=token)


def test_probe_reports_missing_modules(env):
    check = probe_imports(env.python, ["geochat_no_such_module"])[0]
    assert not check.ok and "ModuleNotFoundError" in check.error


def test_requirements_choose_cpu_or_cuda_builds(monkeypatch):
    monkeypatch.delenv("GEOCHAT_LLAMA_CPP_INDEX", raising=False)
    cpu = requirements_for("transformers", "cpu")
    assert cpu.steps[0] == core_step()  # the runtime's core first, for every backend
    assert cpu.steps[1].index_url == "https://download.pytorch.org/whl/cpu"
    assert "torch" in cpu.imports and "rasterio" in cpu.imports
    cuda = requirements_for("llama.cpp", "cuda")
    assert cuda.steps[1].packages == ("llama-cpp-python==0.3.36",)  # stock, no patch
    assert cuda.steps[1].extra_index_urls[0].endswith("/cu124")
    assert dict(cuda.steps[1].env) == {"CMAKE_ARGS": "-DGGML_CUDA=on"}  # a source build: CUDA too
    assert requirements_for("llama.cpp", "cpu").steps[1].env == ()
    monkeypatch.setenv("GEOCHAT_LLAMA_CPP_INDEX", "none")
    assert requirements_for("llama.cpp", "cpu").steps[1].extra_index_urls == ()
    assert requirements_for("openai", "cpu").steps == (core_step(),)
    for accelerator, index in (("cpu", "/whl/cpu"), ("cuda", "/whl/cu124")):
        geopixel = requirements_for("geopixel", accelerator)  # the CPU is a real choice now
        assert geopixel.steps[0] == core_step() and geopixel.steps[1].packages == ("torch",)
        assert geopixel.steps[1].index_url.endswith(index)
        # only torch from its own index; its dependencies from the package index next
        assert "--no-deps" in geopixel.steps[1].pip_args()
        assert geopixel.steps[2].index_url is None and "torch" in geopixel.steps[2].packages
        assert geopixel.describe().count("torch") == 1
        packages = {p for step in geopixel.steps for p in step.packages}
        assert {"transformers", "safetensors", "sentencepiece"} <= packages
        # GeoPixel's own pins are not ours: no clone, no flash attention, no video decoder
        for dropped in ("matplotlib", "hydra-core", "decord", "flash-attn", "accelerate",
                        "einops", "timm", "peft"):
            assert not any(p.split("=")[0].split(">")[0] == dropped for p in packages), dropped
        assert {"torch", "transformers", "safetensors", "sentencepiece"} <= set(geopixel.imports)
    with pytest.raises(DepsError, match="Unknown backend"):
        requirements_for("tensorflow", "cpu")


def test_gpu_detection_reads_nvidia_smi(tmp_path):
    assert nvidia_gpus(str(tmp_path / "absent")) == []
    # nvidia-smi cannot run on this machine: a script printing its CSV format stands in for it
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559, 550.54.15'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    gpus = nvidia_gpus(str(script))
    assert [(g.name, g.memory_mb, g.driver) for g in gpus] == [
        ("NVIDIA H100 80GB HBM3", 81559, "550.54.15")]


def test_diagnostics_redact_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "data"))
    record_error(f"runtime crashed\nloading {Path.home()}/models/m.gguf")
    env = ManagedEnv(tmp_path / "env")
    env.path.mkdir()
    env.log_path.write_text(f"Collecting x\nERROR: could not write {Path.home()}/secret/file\n")
    text = diagnostics_text(env, backends=("openai",))
    assert "ERROR: could not write ~/secret/file" in text
    assert "runtime crashed loading ~/models/m.gguf" in text  # one line per recorded failure
    assert f"{Path.home()}/secret" not in text
    assert "backend openai: ready" in text
    assert redact(str(Path.home() / "a")) == os.path.join("~", "a")


def test_cli_install_dry_run_and_unknown_backend(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GEOCHAT_LLAMA_CPP_INDEX", raising=False)
    assert main(["deps", "--env", str(tmp_path / "e"), "install", "llama.cpp", "--cpu",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pip install numpy pillow rasterio shapely pyproj pyogrio" in out
    assert "pip install llama-cpp-python==0.3.36 --extra-index-url" in out
    assert ("/whl/metal" if sys.platform == "darwin" else "/whl/cpu") in out
    assert not (tmp_path / "e").exists()  # a dry run creates nothing
    assert main(["deps", "install", "nope", "--cpu"]) == 1
    assert "Unknown backend 'nope'" in capsys.readouterr().err
