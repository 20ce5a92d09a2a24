"""Small QGIS helpers: logging into the message log, settings over QgsSettings."""
