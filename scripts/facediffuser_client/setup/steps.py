"""A step of the set-up, and the error that ends one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class SetupError(Exception):
    """A step that cannot go on; the message says why and what to do, and the set-up moves on to the next step."""


@dataclass
class Step:
    summary: str  # what the step does, or why nothing needs doing
    run: Callable[[], None] | None = None  # None: already in place
    licence: str | None = None  # named before the step downloads anything
