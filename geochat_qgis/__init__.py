"""GeoChat for QGIS: talk to remote-sensing vision-language models about a raster."""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    """QGIS entry point: build the plugin (imported lazily so the core works without QGIS)."""
    from .plugin import GeoChatPlugin

    return GeoChatPlugin(iface)
