"""QGIS's proxy settings (Settings > Options > Network) as the runtime's get requests carry them."""
from __future__ import annotations

from typing import Optional

from qgis.core import QgsSettings


def qgis_proxy(settings: Optional[QgsSettings] = None) -> Optional[dict]:
    """QGIS's proxy (Settings > Options > Network) for the runtime's downloads, or None when
    QGIS uses none (the runtime then keeps its environment's)."""
    settings = settings or QgsSettings()
    if str(settings.value("proxy/proxyEnabled", False)).lower() not in ("true", "1"):
        return None

    def urls(key: str) -> list[str]:
        value = settings.value(key, []) or []
        return [u for u in ([value] if isinstance(value, str) else list(value)) if u]

    return {"enabled": True, "type": str(settings.value("proxy/proxyType", "DefaultProxy")),
            "host": str(settings.value("proxy/proxyHost", "") or ""),
            "port": str(settings.value("proxy/proxyPort", "") or ""),
            "user": str(settings.value("proxy/proxyUser", "") or ""),
            "password": str(settings.value("proxy/proxyPassword", "") or ""),
            "excluded": urls("proxy/proxyExcludedUrls") + urls("proxy/noProxyUrls")}
