"""The build an activity works for, bound once so every log line and trace span of the
activity (and of the modules it calls) can name it without threading it through every
signature."""

from __future__ import annotations

import contextvars

_build_name: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "build_name", default=None)


def bind_build_name(build_name: str) -> None:
    """Tag every log line and span of the current activity (task) with `build_name`."""
    _build_name.set(build_name)


def bound_build_name() -> str | None:
    """The build name the current activity bound."""
    return _build_name.get()
