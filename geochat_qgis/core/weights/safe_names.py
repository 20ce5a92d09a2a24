"""File names that come from outside (a hub's listing, a catalog, a request), checked before
they touch the disk.

A name is safe when it is a relative POSIX path that stays inside the model's folder on every
system the plugin runs on: no absolute path, no drive letter, no ``..``, no empty or ``.`` part,
no backslash, no control character, no character or device name Windows refuses (CON, NUL,
COM1, LPT1... also with an extension), no part ending in a space or a dot (Windows drops them,
so two names would be one file). ``inside`` is the second line: the path a file is about to be
written at, resolved (symbolic links followed), must still lie in the folder.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ..errors import ModelError

_DEVICES = frozenset({"con", "prn", "aux", "nul", "conin$", "conout$", "clock$"}
                     | {f"{port}{n}" for port in ("com", "lpt") for n in "0123456789\u00b9\u00b2\u00b3"})
_WINDOWS_FORBIDDEN = frozenset('<>:"|?*')
_DRIVE = re.compile(r"^[A-Za-z]:")
MAX_PART_BYTES = 255  # the longest file name most file systems take


def shown(name: object) -> str:
    """``name`` printable in a message (control characters escaped)."""
    text = name if isinstance(name, str) else repr(name)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _part_reason(part: str) -> Optional[str]:
    if part == "":
        return "it has an empty part ('//', or a '/' at an end)"
    if part == ".":
        return "it has a '.' part"
    if part == "..":
        return "it has a '..' part, which leaves the folder"
    if part != part.rstrip(" ."):
        return f"the part '{shown(part)}' ends in a space or a dot, which Windows drops"
    if part.split(".")[0].rstrip(" ").lower() in _DEVICES:
        return f"'{shown(part)}' is a Windows device name"
    if len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES:
        return f"a part is longer than {MAX_PART_BYTES} bytes"
    return None


def unsafe_reason(name: object) -> Optional[str]:
    """Why ``name`` is not a safe relative file path inside a folder; None when it is."""
    if not isinstance(name, str):
        return f"it is {name!r}, not a text"
    if not name:
        return "it is empty"
    control = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        return f"it holds the control character {control!r}"
    if "\\" in name:
        return "it holds a backslash, a folder separator on Windows"
    if name.startswith("/"):
        return "it is an absolute path"
    if _DRIVE.match(name):
        return "it starts with a drive letter"
    forbidden = next((c for c in name if c in _WINDOWS_FORBIDDEN), None)
    if forbidden is not None:
        return f"it holds '{forbidden}', which Windows forbids in file names"
    return next(filter(None, map(_part_reason, name.split("/"))), None)


def check_hub_name(name: object, url: str) -> str:
    """``name`` from the hub's listing at ``url`` when it is safe, else ModelError."""
    why = unsafe_reason(name)
    if why is not None:
        raise ModelError(
            f"the hub's listing names an unsafe file path '{shown(name)}' ({why}): refusing to "
            f"download from {url}. Nothing was written. Check that HF_ENDPOINT (or "
            "GEOCHAT_HF_ENDPOINT) names the hub you trust.")
    return name  # type: ignore[return-value]  (a str: unsafe_reason said so)


def check_relative(name: object, where: str) -> str:
    """``name`` from a catalog entry (``where`` says which) when it is safe, else ModelError."""
    why = unsafe_reason(name)
    if why is not None:
        raise ModelError(
            f"{where}: file path '{shown(name)}' is unsafe ({why}): a file path must be "
            "relative to the model's folder, without '..', e.g. 'model.gguf' or 'sub/x.bin'.")
    return name  # type: ignore[return-value]


def inside(folder: Path, name: str) -> Path:
    """``folder / name`` after checking that it resolves inside ``folder`` (the second line
    behind the name checks: a symbolic link on the way must not lead out); ModelError if not.
    The file itself may be a link (one into the Hugging Face cache): it is replaced, not
    followed."""
    path = Path(folder) / name
    root = Path(folder).resolve()
    parent = path.parent.resolve()
    if path.name in ("", ".", "..") or not (parent == root or root in parent.parents):
        raise ModelError(
            f"refusing to write '{shown(name)}': it resolves to {parent / path.name}, outside "
            f"the model's folder {root} (a symbolic link on the way?). Nothing was written; "
            "remove the link, or get the model into an empty cache folder.")
    return path
