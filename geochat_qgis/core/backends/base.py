"""The one interface every inference backend implements."""
from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np


class CancelToken:
    """Set from any thread; backends check it between tokens and between tiles."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class Turn:
    """One exchange of a conversation: the user's text and, once answered, the model's."""

    user: str
    assistant: Optional[str] = None


@dataclass
class Conversation:
    """The prompt for one generation: earlier turns plus the new user text.

    The image goes with the first user turn (LLaVA style). ``family`` names the prompt template
    (``geochat`` uses ``llava_v1``).
    """

    turns: list[Turn]
    family: str = "geochat"


@dataclass
class GenerateOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy, as the papers evaluate
    stop: Sequence[str] = ()
    on_token: Optional[Callable[[int, str], None]] = None  # (image index, text piece)
    cancel: Optional[CancelToken] = None
    grammar: Optional[str] = None  # GBNF, llama.cpp only


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

    def close(self) -> None:
        """Free the model."""
