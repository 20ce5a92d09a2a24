"""The shards a ``*.index.json`` names, checked before any is opened.

An index comes with the model's files (a hub, a shared folder, a download from anywhere), so its
``weight_map`` is outside input: every shard name it holds must be a safe relative path inside
the model's folder (safe_names.py: no ``..``, no absolute path, no drive letter, no symbolic link
on the way out), or a hostile index could make the loader read any file on the disk as a shard.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError
from .safe_names import inside, shown, unsafe_reason


def _weight_map(index: Path, again: str) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> shard name), checked to be one."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{index} is not a valid shard index ({exc}); {again}.") from exc
    if not isinstance(weight_map, dict):
        raise ModelError(f"{index} is not a valid shard index (its weight_map is a "
                         f"{type(weight_map).__name__}, not an object); {again}.")
    return weight_map


def _shard_path(folder: Path, index: Path, tensor: str, name: object, again: str) -> Path:
    """``folder / name`` for the shard the index names for ``tensor``; ModelError if unsafe."""
    refuse = (f"{index} names the shard '{shown(name)}' for the tensor '{shown(tensor)}', "
              "which {why}: a shard must be a file in the model's folder. Nothing was read; the "
              f"index is damaged or was made to read other files: {again}.")
    why = unsafe_reason(name)
    if why is not None:
        raise ModelError(refuse.format(why=f"is unsafe ({why})"))
    try:
        return inside(folder, name)  # type: ignore[arg-type]  (a str: unsafe_reason said so)
    except ModelError as exc:
        raise ModelError(refuse.format(why="lies outside the model's folder (a symbolic link on "
                                           "the way?)")) from exc


def index_shards(folder: Path, index: Path, again: str = "download the model again") -> list[Path]:
    """The shard files ``index`` (in ``folder``) names, sorted, each checked to be a safe path
    inside ``folder`` and to exist. ModelError naming the index and the entry otherwise; ``again``
    says what to do (e.g. "download the model again")."""
    folder = Path(folder)
    shards: dict[str, Path] = {}
    for tensor, name in _weight_map(index, again).items():
        if not (isinstance(name, str) and name in shards):
            shards[name] = _shard_path(folder, index, tensor, name, again)
    missing = [name for name, path in sorted(shards.items()) if not path.is_file()]
    if missing:
        raise ModelError(f"{folder} is incomplete: {', '.join(map(shown, missing))} named in "
                         f"{index.name} {'is' if len(missing) == 1 else 'are'} missing; {again}.")
    return [shards[name] for name in sorted(shards)]
