"""The steps behind ``python3 build.py``: set-up (Debian packages and the Python environments),
the plugin zip and its installation, QGIS runs, the test tiers and the Debian chroot tiers.
Standard library only; build.py is the entry point with the commands."""
