"""build.py package/install: the zip obeys plugins.qgis.org's rules, and install enables it."""
from __future__ import annotations

import importlib.util
import re
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_build():
    spec = importlib.util.spec_from_file_location("geochat_build", ROOT / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["geochat_build"] = module
    spec.loader.exec_module(module)
    return module


build = _load_build()


@pytest.fixture(scope="module")
def plugin_zip(tmp_path_factory) -> Path:
    build.DIST = tmp_path_factory.mktemp("dist")
    return build.package()


def test_zip_name_and_version_come_from_metadata(plugin_zip):
    version = re.search(r"^version=(.+)$", (ROOT / "metadata.txt").read_text(), re.M).group(1)
    assert plugin_zip.name == f"geochat_qgis-{version}.zip"


def test_zip_passes_every_rule(plugin_zip):
    assert build.check_plugin_zip(plugin_zip) == []
    names = zipfile.ZipFile(plugin_zip).namelist()
    assert {n.split("/")[0] for n in names} == {"geochat_qgis"}
    for required in ("__init__.py", "metadata.txt", "LICENSE", "resources/icon.png",
                     "resources/demo/cogeo.tif", "resources/styles/detections_boxes.qml",
                     "models/catalog.json", "core/errors.py"):
        assert f"geochat_qgis/{required}" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if "buildtools" in n or n.endswith("build.py")]  # build steps stay out
    assert plugin_zip.stat().st_size < build.MAX_ZIP_BYTES


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a zip, letting ``edit(name, data)`` return (name, data) or None to drop a member."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            result = edit(info.filename, old.read(info.filename))
            if result is not None:
                new.writestr(result[0], result[1])
    return dst


def _without_metadata_key(key):
    def edit(name, data):
        if name.endswith("/metadata.txt"):
            data = re.sub(rf"^{key}=.*\n".encode(), b"", data, flags=re.M)
        return name, data
    return edit


@pytest.mark.parametrize(
    "edit, rule",
    [
        (lambda n, d: None if n.endswith("/LICENSE") else (n, d), "LICENSE is missing"),
        (lambda n, d: None if n.endswith("resources/icon.png") else (n, d), "icon"),
        (lambda n, d: (n, d), None),  # an unchanged copy passes: the check is not failing all
        (lambda n, d: (n.replace("core/errors.py", "core/__pycache__/errors.cpython-311.pyc"), d),
         "forbidden file"),
        (lambda n, d: (n.replace("geochat_qgis/", "1geochat/", 1), d), "does not match"),
        (lambda n, d: (n.replace("geochat_qgis/LICENSE", "geochat_qgis/../LICENSE"), d), "'..' path"),
        (_without_metadata_key("email"), "'email'"),
        (_without_metadata_key("qgisMinimumVersion"), "'qgisMinimumVersion'"),
        (_without_metadata_key("repository"), "'repository'"),
    ],
)
def test_each_rule_catches_a_broken_zip(plugin_zip, tmp_path, edit, rule):
    broken = _rewrite(plugin_zip, tmp_path / "broken.zip", edit)
    problems = build.check_plugin_zip(broken)
    if rule is None:
        assert problems == []
    else:
        assert any(rule in p for p in problems), problems


def test_two_top_folders_and_macosx_are_refused(plugin_zip, tmp_path):
    broken = tmp_path / "extra.zip"
    _rewrite(plugin_zip, broken, lambda n, d: (n, d))
    with zipfile.ZipFile(broken, "a") as archive:
        archive.writestr("__MACOSX/._x", b"")
    problems = build.check_plugin_zip(broken)
    assert any("exactly one top folder" in p for p in problems)
    assert any("__MACOSX" in p for p in problems)


def test_package_refuses_a_bad_tree_and_leaves_no_zip(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "DIST", tmp_path / "dist")
    monkeypatch.setattr(build.packaging, "EXTRA_FILES", [("metadata.txt", "metadata.txt")])  # no LICENSE
    with pytest.raises(build.BuildError, match="LICENSE is missing"):
        build.package()
    assert not list((tmp_path / "dist").iterdir())


def test_install_unpacks_and_enables_in_a_profile(plugin_zip, tmp_path):
    ini = tmp_path / "profiles" / "p1" / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text("[General]\nfoo=bar\n\n[PythonPlugins]\nother=true\ngeochat_qgis=false\n")
    target = build.install(plugin_zip, qgis_dir=tmp_path, profile="p1")
    assert target == tmp_path / "profiles" / "p1" / "python" / "plugins" / "geochat_qgis"
    assert (target / "metadata.txt").is_file() and (target / "__init__.py").is_file()
    text = ini.read_text()
    assert "geochat_qgis=true" in text and "geochat_qgis=false" not in text
    assert "other=true" in text and "foo=bar" in text
    # reinstall over an existing copy replaces it
    (target / "stale.py").write_text("x = 1\n")
    build.install(plugin_zip, qgis_dir=tmp_path, profile="p1")
    assert not (target / "stale.py").exists()
    assert text.count("[PythonPlugins]") == 1
