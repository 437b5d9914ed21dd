"""How the activities that write (agent dispatch, the summary) fail.

Their retry policies retry without an attempt limit (policies.DISPATCH_RETRY,
policies.SUMMARY), because a full or read-only folder must be waited out however long
it takes. This is where the other failures get their limit back: from the given attempt
on, they are raised as non-retryable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from temporalio import activity
from temporalio.exceptions import ApplicationError

from exceptions import DiskWriteError

log = logging.getLogger(__name__)


@contextmanager
def write_attempt(max_attempts: int) -> Iterator[None]:
    """A DiskWriteError fails this attempt retryably (its failure type, the folder
    and errno in its message); any other exception does too, unless this is attempt
    `max_attempts` or later, when it is final. ApplicationErrors raised on purpose, and
    the SDK's own control flow (complete-async, cancellation), pass untouched."""
    try:
        yield
    except ApplicationError:
        raise
    except DiskWriteError as err:
        info = activity.info()
        log.warning("stage_waits_for_disk", extra={
            "activity": info.activity_type, "attempt": info.attempt, "folder": err.folder,
            "error": str(err)})
        raise DiskWriteError.failure(str(err)) from None
    except Exception as err:
        # Typed by class name, as the SDK types an exception it converts itself.
        final = activity.info().attempt >= max_attempts
        failure_type = type(err).__name__
        raise ApplicationError(str(err) or failure_type, type=failure_type,
                               non_retryable=final) from err
