"""QGIS's proxy settings -> the environment variables the runtime child's downloads honour.

The front end reads QGIS's network settings (``proxy/proxyEnabled``, ``proxy/proxyType``,
``proxy/proxyHost``, ``proxy/proxyPort``, ``proxy/proxyUser``, ``proxy/proxyPassword``,
``proxy/proxyExcludedUrls``, ``proxy/noProxyUrls``) and starts the runtime child with
``proxy_environment(...)`` merged into its environment. urllib (the project's downloader) and
huggingface_hub both read ``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY``. The dock sends
them with each get request instead; :func:`apply_proxy` sets them in the runtime child. Standard
library only (with the downloader's error).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Optional
from urllib.parse import quote, urlsplit

from .download import DownloadError

PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy",
                   "no_proxy")
HTTP_KINDS = ("HttpProxy", "HttpCachingProxy", "DefaultProxy", "http")
_BEFORE_PROXY: dict[str, Optional[str]] = {}  # the variables apply_proxy replaced, as they were


def _host_of(url: str) -> str:
    url = url.strip()
    return (urlsplit(url).hostname or url) if "://" in url else url.split("/")[0]


def proxy_environment(host: str, port: Optional[int] = None, user: Optional[str] = None,
                      password: Optional[str] = None, kind: str = "HttpProxy",
                      excluded: Iterable[str] = ()) -> dict[str, str]:
    """The variables for an HTTP proxy (both spellings: tools differ in which they read).

    ``excluded``: hosts or URLs to reach directly (QGIS's excluded / no-proxy URLs); local
    addresses are always direct. Raises ValueError for a proxy kind downloads cannot use
    (SOCKS: urllib has no SOCKS client).
    """
    if kind not in HTTP_KINDS:
        raise ValueError(f"Proxy type {kind!r} is not supported for model downloads: use an "
                         "HTTP proxy in QGIS's network settings, or download on another machine "
                         "and copy the files into the model cache.")
    host = host.strip()
    if "://" in host:
        host = urlsplit(host).netloc
    credentials = ""
    if user:
        credentials = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "") + "@"
    url = f"http://{credentials}{host}" + (f":{port}" if port else "")
    direct = ["localhost", "127.0.0.1", "::1", *(_host_of(u) for u in excluded if u.strip())]
    no_proxy = ",".join(dict.fromkeys(direct))
    return {"HTTPS_PROXY": url, "HTTP_PROXY": url, "NO_PROXY": no_proxy,
            "https_proxy": url, "http_proxy": url, "no_proxy": no_proxy}


def apply_proxy(options: Mapping[str, Any]) -> None:
    """QGIS's proxy (``options["proxy"]``: enabled, type, host, port, user, password,
    excluded) as this child's HTTPS_PROXY / HTTP_PROXY / NO_PROXY, which the downloads read.
    Nothing said, disabled, or QGIS's "default" (system) proxy: the environment's own (a proxy
    set by an earlier request is taken back)."""
    for name, value in _BEFORE_PROXY.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _BEFORE_PROXY.clear()
    proxy = options.get("proxy") or {}
    if not proxy.get("enabled") or not proxy.get("host"):
        return
    try:
        variables = proxy_environment(
            str(proxy["host"]), int(proxy["port"]) if proxy.get("port") else None,
            proxy.get("user") or None, proxy.get("password") or None,
            str(proxy.get("type") or "HttpProxy"), proxy.get("excluded") or ())
    except ValueError as exc:
        raise DownloadError(str(exc)) from None
    _BEFORE_PROXY.update({name: os.environ.get(name) for name in variables})
    os.environ.update(variables)
