"""The one interface every inference backend implements.

A backend is built unloaded (cheap), loads explicitly with :meth:`Backend.load` (idempotent: a
second call reuses the loaded model) and answers one conversation about one or more images with
:meth:`Backend.generate`. In-process backends (llama.cpp, transformers, GeoPixel), the HTTP client
and the subprocess runtime all implement this same class.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..cancel import CancelToken  # noqa: F401 - its home before; many import it from here


@dataclass
class Turn:
    """One exchange of a conversation: the user's text and, once answered, the model's."""

    user: str
    assistant: Optional[str] = None


@dataclass
class Conversation:
    """The prompt for one generation: earlier turns plus the new user text.

    The image goes with the first user turn (LLaVA style). ``family`` names the prompt template
    (``geochat`` uses ``llava_v1``; ``qwen2.5-vl`` the model's own chat template).
    """

    turns: list[Turn]
    family: str = "geochat"

    @classmethod
    def single(cls, text: str, family: str = "geochat") -> "Conversation":
        """A one-turn conversation asking ``text``."""
        return cls([Turn(text)], family)

    def pairs(self) -> list[tuple[str, Optional[str]]]:
        """``[(user, assistant or None), ...]`` as the template functions take them."""
        return [(turn.user, turn.assistant) for turn in self.turns]


TokenCallback = Callable[[int, str], None]  # (image index in the batch, text piece)


@dataclass
class GenerateOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy, as the papers evaluate
    stop: Sequence[str] = ()
    on_token: Optional[TokenCallback] = None
    cancel: Optional[CancelToken] = None
    grammar: Optional[str] = None  # GBNF, llama.cpp only (others ignore it)
    seed: int = 0  # used when temperature > 0

    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` when the cancel token is set."""
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()


@dataclass
class Generation:
    """What one image + conversation produced."""

    text: str
    masks: Optional[np.ndarray] = None  # GeoPixel: (n, H, W) logits or booleans
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """A loaded model that answers conversations about images (RGB uint8, H x W x 3)."""

    name: str = "backend"
    #: how many images one :meth:`generate` call handles well at once (the pipeline's batch)
    batch_size: int = 1

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model (idempotent: a second call reuses what is loaded)."""

    @abc.abstractmethod
    def generate(
        self,
        images: Sequence[np.ndarray],
        conversation: Conversation,
        options: GenerateOptions,
    ) -> list[Generation]:
        """One generation per image, same conversation for each; raises Cancelled, BackendError."""

    def describe(self) -> str:
        """One line naming the backend and model, for logs, summaries and result attributes."""
        return self.name

    def close(self) -> None:
        """Free the model."""

    def __enter__(self) -> "Backend":
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` cut before the first stop string it contains (for backends without native stops)."""
    cut = min((index for index in (text.find(s) for s in stop if s) if index >= 0), default=-1)
    return text if cut < 0 else text[:cut]
