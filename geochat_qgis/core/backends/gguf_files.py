"""Checks on GGUF files before llama.cpp sees them, so a bad file gets a message, not a crash.

llama.cpp reports a wrong, truncated or mismatched file with a bare "failed to load" (or aborts
the process); these checks read the GGUF header with the ``gguf`` package first (opened by
core/gguf_reader.py, which the vision code's mmproj reader shares) and say what is wrong and
what to do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ModelError
from ..gguf_reader import open_gguf
from .gguf_checks import check_gguf_tensors

#: tensors whose output size is the embedding size a projector feeds the text model, in order
_PROJECTOR_OUTPUTS = ("mm.2.weight", "mm.model.fc.weight", "mm.1.weight", "mm.0.weight")


@dataclass
class GGUFInfo:
    """What the loader needs to know about one GGUF file."""

    path: Path
    architecture: str
    embedding_length: Optional[int]  # text model: n_embd; mmproj: the projector's output size
    image_size: Optional[int] = None  # mmproj only

    @property
    def is_projector(self) -> bool:
        return self.architecture == "clip"


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0]


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Header facts of ``path``; raises ModelError for a missing, non-GGUF or truncated file."""
    path = Path(path)
    reader = open_gguf(path)
    architecture = _field(reader, "general.architecture") or "unknown"
    check_gguf_tensors(reader, path, architecture, _field)
    if architecture == "clip":
        shapes = {tensor.name: [int(n) for n in tensor.shape] for tensor in reader.tensors}
        output = next((shapes[name][1] for name in _PROJECTOR_OUTPUTS
                       if len(shapes.get(name, ())) == 2), None)
        embedding = _field(reader, "clip.vision.projection_dim") or output
        image_size = _field(reader, "clip.vision.image_size")
        return GGUFInfo(path, architecture, embedding, image_size)
    return GGUFInfo(path, architecture, _field(reader, f"{architecture}.embedding_length"))


def find_projector(folder: Path, exclude: Path) -> Optional[Path]:
    """The mmproj GGUF in ``folder``: by name first, then by its ``clip`` architecture."""
    candidates = sorted(p for p in folder.glob("*.gguf") if p.resolve() != exclude.resolve())
    named = [p for p in candidates if "mmproj" in p.name.lower()]
    if named:
        return named[0]
    for candidate in candidates:
        try:
            if read_gguf_info(candidate).is_projector:
                return candidate
        except ModelError:
            continue
    return None


def resolve_gguf_pair(model: str | os.PathLike[str], mmproj: Optional[str | os.PathLike[str]]
                      ) -> tuple[GGUFInfo, GGUFInfo]:
    """The checked (text model, mmproj) pair from a folder or a file plus optional mmproj.

    Raises ModelError naming the problem: no GGUF in the folder, the mmproj given as the model, no
    mmproj found, or an mmproj whose embedding size does not match the text model.
    """
    model = Path(model)
    if model.is_dir():
        texts = sorted(p for p in model.glob("*.gguf") if "mmproj" not in p.name.lower())
        texts = [p for p in texts if not read_gguf_info(p).is_projector]
        if not texts:
            raise ModelError(
                f"No GGUF text model in {model}. Put the model .gguf and its mmproj .gguf there, "
                "or pass the model file with --mmproj FILE."
            )
        if len(texts) > 1:
            names = ", ".join(p.name for p in texts)
            raise ModelError(f"Several GGUF text models in {model} ({names}): pass one file.")
        model = texts[0]
    text = read_gguf_info(model)
    if text.is_projector:
        raise ModelError(
            f"{model.name} is a vision projector (mmproj), not a text model. Pass the text model "
            "GGUF as the model and this file as --mmproj."
        )
    projector_path = Path(mmproj) if mmproj else find_projector(model.parent, model)
    if projector_path is None:
        raise ModelError(
            f"No mmproj (vision projector) GGUF found beside {model.name}. Put the model's "
            "mmproj-*.gguf in the same folder or pass it with --mmproj FILE."
        )
    projector = read_gguf_info(projector_path)
    if not projector.is_projector:
        raise ModelError(
            f"{projector_path.name} is not a vision projector (its architecture is "
            f"'{projector.architecture}'). Pass the model's mmproj GGUF as --mmproj."
        )
    if (text.embedding_length and projector.embedding_length
            and text.embedding_length != projector.embedding_length):
        raise ModelError(
            f"The mmproj {projector_path.name} does not belong to {model.name}: it projects to "
            f"{projector.embedding_length} dimensions but the text model has "
            f"{text.embedding_length}. Use the mmproj published or converted with this model."
        )
    return text, projector
