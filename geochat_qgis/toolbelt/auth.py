"""The server API key lives in the QGIS authentication manager, never in plain settings."""
from __future__ import annotations

from typing import Optional

from qgis.core import QgsApplication, QgsAuthMethodConfig

from ..core.errors import BackendError


def api_key_from_auth_manager(config_id: str) -> Optional[str]:
    """The key stored in auth config ``config_id`` (a Basic config's password, or an API-header
    config's first value); BackendError when the config cannot be read."""
    config = QgsAuthMethodConfig()
    if not QgsApplication.authManager().loadAuthenticationConfig(config_id, config, True):
        raise BackendError(
            f"the QGIS authentication config '{config_id}' could not be read: check it under "
            "Settings > Options > Authentication, or choose another in the GeoChat settings"
        )
    values = config.configMap()
    return values.get("password") or values.get("key") or next(iter(values.values()), None)


def store_api_key(name: str, key: str) -> str:
    """Save ``key`` in the auth manager as a Basic config; returns its id for the settings."""
    config = QgsAuthMethodConfig("Basic")
    config.setName(name)
    config.setConfig("username", "api")
    config.setConfig("password", key)
    if not QgsApplication.authManager().storeAuthenticationConfig(config):
        raise BackendError("QGIS could not store the API key: set a master password first "
                           "(Settings > Options > Authentication)")
    return config.id()
