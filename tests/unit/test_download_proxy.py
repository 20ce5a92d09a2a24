"""QGIS's proxy settings reach the downloads as environment variables (proxy.py's contract)."""
from __future__ import annotations

import base64
import hashlib

import pytest
from hub_repos import serve_repo_hub

from geochat_qgis.core.weights.download import download_file, file_url
from geochat_qgis.core.weights.proxy import PROXY_VARIABLES, proxy_environment


@pytest.fixture
def hub(tmp_path):
    server = next(generator := serve_repo_hub())
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"x" * 5000)
    server.add_folder("o/r", folder, commit="f" * 40)
    yield server
    generator.close()


@pytest.fixture
def clean_env(monkeypatch):
    for name in PROXY_VARIABLES + ("HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _use(monkeypatch, variables):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_downloads_go_through_qgis_proxy_with_its_credentials(hub, clean_env, tmp_path):
    port = hub.server_address[1]
    _use(clean_env, proxy_environment("127.0.0.1", port, user="ana", password="p@ss:word"))
    url = file_url("o/r", "main", "w.bin", "http://models.example.invalid")
    digest = download_file(url, tmp_path / "w.bin", size=5000)
    assert digest == hashlib.sha256(b"x" * 5000).hexdigest()
    assert hub.proxied == [url]
    assert hub.proxy_auth == ["Basic " + base64.b64encode(b"ana:p@ss:word").decode()]


def test_excluded_hosts_are_reached_directly(hub, clean_env, tmp_path):
    _use(clean_env, proxy_environment("proxy.example.invalid", 3128,
                                      excluded=["https://mirror.example.org/hub", "10.1.2.3"]))
    env = proxy_environment("proxy.example.invalid", 3128, excluded=["https://mirror.example.org/x"])
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1,mirror.example.org"
    # 127.0.0.1 is always direct: the (unreachable) proxy is never asked
    download_file(file_url("o/r", "main", "w.bin", hub.url), tmp_path / "w.bin", size=5000)
    assert hub.proxied == []


def test_socks_proxies_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="HTTP proxy"):
        proxy_environment("127.0.0.1", 1080, kind="Socks5Proxy")
