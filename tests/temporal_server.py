"""A Temporal dev server for the duration of a block (tools/devserver.py starts and stops it),
like tools/synapse.py for Synapse: `with running(log_path=...) as address`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tools import devserver


@contextlib.contextmanager
def running(port: int | None = None, **options: Any) -> Iterator[str]:
    """A headless dev server on `port` (default: a free one); yields its address."""
    chosen = port or devserver.free_port()
    process = devserver.start(chosen, **options)
    try:
        yield f"127.0.0.1:{chosen}"
    finally:
        devserver.stop(process)
