"""A run's finished tiles on disk while it goes on, so a killed runtime loses nothing.

After each batch the runtime appends one JSON line (the batch's georeferenced detections before
merging, its tile ids and failures) to a hidden file beside the output, named by the output and
the run id: each run has its own (two runs never share or delete each other's). A fresh runtime
reads it back after a crash (:func:`read_checkpoint`, a torn last line is ignored), merges and
writes the output; a run that ends normally deletes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import shapely

from ..errors import ExportError
from ..results import Detection


def checkpoint_path(output: Path, run_id: str) -> Path:
    """The hidden checkpoint file of run ``run_id`` (checked by the caller) writing ``output``."""
    return output.with_name(f".{output.name}.{run_id}.partial.jsonl")


def encode_detection(det: Detection) -> dict[str, Any]:
    return {"wkb": shapely.to_wkb(det.geometry, hex=True, output_dimension=2),
            "label": det.label, "kind": det.kind, "phrase": det.phrase,
            "span": list(det.span) if det.span else None,
            "bbox": list(det.bbox) if det.bbox else None, "angle": det.angle, "score": det.score,
            "margin": det.margin, "flags": list(det.flags), "tile_id": det.tile_id,
            "frame": det.frame, "attributes": det.attributes}


def decode_detection(data: dict[str, Any], crs: Optional[str]) -> Detection:
    return Detection(
        label=data["label"], geometry=shapely.from_wkb(data["wkb"]), kind=data["kind"],
        phrase=data["phrase"], span=tuple(data["span"]) if data["span"] else None,
        bbox=tuple(data["bbox"]) if data["bbox"] else None, angle=data["angle"],
        score=data["score"], margin=data["margin"], flags=list(data["flags"]),
        tile_id=data["tile_id"], frame=data["frame"], crs=crs, attributes=data["attributes"])


class Checkpoint:
    """Appends batches to ``path`` (created new, never over another run's file; the header
    names the run). ExportError when the file is already there."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        try:
            self._file = path.open("x", encoding="utf-8")
        except FileExistsError:
            raise ExportError(
                f"{path} already holds the finished tiles of a run with the id "
                f"{header.get('run_id')!r}, running or killed and not yet recovered: leave the "
                "run id out to get a new one") from None
        self._write({"header": header})

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        self._file.flush()  # in the OS's hands now: it survives the process being killed

    def add(self, tile_ids: Sequence[str], found: Sequence[Detection],
            failures: Sequence[Any], total: int) -> None:
        crs = found[0].crs if found else None
        self._write({"tiles": list(tile_ids), "total": total, "crs": crs,
                     "found": [encode_detection(d) for d in found],
                     "failures": [{"tile": f.tile_id, "message": f.message, "prompt": f.prompt}
                                  for f in failures]})

    def close(self, remove: bool = True) -> None:
        self._file.close()
        if remove:
            self.path.unlink(missing_ok=True)


@dataclass
class Recovered:
    header: dict[str, Any] = field(default_factory=dict)
    detections: list[Detection] = field(default_factory=list)
    tiles: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    crs: Optional[str] = None


def read_checkpoint(path: Path) -> Recovered:
    """What a killed run had finished (empty when it left no checkpoint)."""
    found = Recovered()
    if not path.is_file():
        return found
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                break  # the line being written when the process died
            if "header" in record:
                found.header = record["header"]
                continue
            found.crs = found.crs or record.get("crs")
            found.tiles += record["tiles"]
            found.total = max(found.total, record["total"])
            found.failures += record["failures"]
            found.detections += [decode_detection(d, record.get("crs")) for d in record["found"]]
    return found
