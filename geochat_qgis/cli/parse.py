"""``parse``: raw model text on stdin -> one JSON object with the text and detections."""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from ..core.errors import GeoChatError
from ..core.families import FAMILIES, get_family

DECIMALS = 4
NPY_MAGIC = b"\x93NUMPY"  # how every numpy.save file starts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES), help="model family")
    parser.add_argument(
        "--tile-size", type=_positive, metavar="N",
        help="side of the square tile the model saw, in pixels (default: the family's tile "
        "size, GeoChat 504, Qwen2.5-VL 896, GeoPixel 1680)",
    )
    parser.add_argument(
        "--masks", metavar="FILE.npy",
        help="GeoPixel: the (n, H, W) mask logits or booleans saved with numpy.save",
    )
    parser.add_argument(
        "--angle-convention", choices=("none", "ccw", "cw"), default="none",
        help="GeoChat: how to read the box angle (default none: axis-aligned boxes)",
    )
    parser.add_argument(
        "--label", default="object", help="label for boxes the text names no phrase for"
    )


def load_masks(path: str) -> Any:
    """The mask array saved with numpy.save at ``path``; GeoChatError saying what the file is
    instead (missing, not a .npy file, Python objects, damaged)."""
    import numpy as np

    try:
        with open(path, "rb") as handle:
            head = handle.read(len(NPY_MAGIC))
    except OSError as exc:
        raise GeoChatError(f"could not read the masks {path}: {exc.strerror or exc}") from None
    if head != NPY_MAGIC:
        raise GeoChatError(f"the masks {path} are not a .npy file (it starts with {head!r}): "
                           "save the (n, H, W) masks with numpy.save(path, masks)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise GeoChatError(f"the masks {path} hold Python objects, not mask values: save a "
                               "boolean or number array with numpy.save") from None
        raise GeoChatError(f"the masks {path} are a damaged .npy file ({exc}): save them again "
                           "with numpy.save") from None
    except OSError as exc:
        raise GeoChatError(f"could not read the masks {path}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    import json


    try:
        data = sys.stdin.buffer.read()
    except OSError as exc:
        raise GeoChatError(f"could not read the model output on stdin: {exc}") from exc
    raw = data.decode("utf-8", errors="replace")
    masks = load_masks(args.masks) if args.masks else None
    settings = {"angle_convention": args.angle_convention} if args.family == "geochat" else {}
    family = get_family(args.family, **settings)
    tile_size = args.tile_size or family.preprocess.size
    answer = family.parse(raw, tile_size, masks, default_label=args.label)
    problems = list(answer.problems)
    if "\ufffd" in raw and b"\xef\xbf\xbd" not in data:
        problems.insert(0, "the input is not valid UTF-8: undecodable bytes were replaced")
    document = {
        "text": answer.text,
        "detections": [_detection_json(d) for d in answer.detections],
        "problems": problems,
    }
    json.dump(document, sys.stdout, ensure_ascii=False, allow_nan=False)  # strict JSON
    sys.stdout.write("\n")
    return 0


def _detection_json(det: Any) -> dict[str, Any]:
    """One detection as the command prints it; ``polygon`` is the largest part's outline."""
    geometry = det.geometry
    if geometry.geom_type != "Polygon":
        geometry = max(getattr(geometry, "geoms", [geometry]), key=lambda g: g.area)
    return {
        "label": det.label,
        "bbox": [round(v, DECIMALS) for v in det.bbox],
        "angle": det.angle if det.angle is not None and math.isfinite(det.angle) else None,
        "polygon": [[round(x, DECIMALS), round(y, DECIMALS)] for x, y in geometry.exterior.coords],
    }


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of pixels")
    return value
