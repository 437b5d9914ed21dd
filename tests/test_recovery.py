"""startup/recovery.py's judgements: which dead worker, which task, which attempt. The sweep
itself runs against a real server and a killed worker.py in tests/test_faults.py."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from temporalio import activity

from config import load_config
from policies import DISPATCH_ATTEMPTS, SUMMARY_ATTEMPTS
from startup.recovery import crash_limit_reached, dispatched, process_gone, task_id_of
from taskfiles.documents import new_task
from taskfiles.lookup import write_task
from vocabulary import (
    AGENT_ACTIVITIES,
    IMPLEMENT_BUILD,
    INLINE_ACTIVITIES,
    PROCESS_TRIAGE_OUTPUT,
    SUMMARIZE_WORKFLOW,
    TASK_BUILD_PLAN,
    UNRECOVERED_ACTIVITIES,
)
from worker import worker_activities


def test_only_a_gone_process_on_this_host_counts_as_dead() -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    me = os.getpid()
    assert process_gone(f"host-a:{dead_pid}", "host-a", me)
    assert not process_gone(f"host-b:{dead_pid}", "host-a", me)   # another host: never judged
    assert not process_gone(f"host-a:{me}", "host-a", me)          # ourselves
    assert not process_gone(f"host-a:{os.getppid()}", "host-a", me)  # alive
    assert not process_gone(f"{dead_pid}@host-a", "host-a", me)    # not a worker identity
    assert not process_gone("host-a:", "host-a", me)


def test_task_id_from_either_input_shape() -> None:
    assert task_id_of({"task_id": "t-1", "build_name": "b"}) == "t-1"
    assert task_id_of({"build_name": "b", "task": {"task_id": "t-2"}}) == "t-2"
    assert task_id_of(None) is None
    assert task_id_of({"task": "x"}) is None


def test_dispatched_means_this_attempt_has_a_file(tmp_path: Path) -> None:
    config = load_config({"TASK_QUEUE_DIR": str(tmp_path / "q")})
    task_id = str(uuid.uuid4())
    assert not dispatched(config, task_id, "3", 1)
    write_task(config.task_queue_dir, new_task(
        task_id=task_id, target_agent="builder", task_type=TASK_BUILD_PLAN, summary="s",
        payload={"activity_id": "3", "attempt": 1, "task_token": "eA=="}))
    assert dispatched(config, task_id, "3", 1)
    assert not dispatched(config, task_id, "3", 2)  # file of an older attempt: stale token


def test_every_registered_activity_is_recovered_or_exempt(tmp_path: Path) -> None:
    """A new activity must be placed in vocabulary.py's recovery sets, or it would never be
    recovered after a SIGKILL; names there that no activity carries are stale."""
    config = load_config({"TASK_QUEUE_DIR": str(tmp_path / "q")})
    registered = [activity._Definition.must_from_callable(fn).name
                  for fn in worker_activities(config)]
    assert len(registered) == len(set(registered))
    groups = (AGENT_ACTIVITIES, INLINE_ACTIVITIES, UNRECOVERED_ACTIVITIES)
    placed = [name for group in groups for name in group]
    assert len(placed) == len(set(placed)), "an activity is in two recovery groups"
    assert set(registered) == set(placed)


def test_a_lost_worker_ends_an_unlimited_dispatch_or_summary_at_their_attempt_limit() -> None:
    assert not crash_limit_reached(IMPLEMENT_BUILD, DISPATCH_ATTEMPTS - 1, 0)
    assert crash_limit_reached(IMPLEMENT_BUILD, DISPATCH_ATTEMPTS, 0)
    assert crash_limit_reached(SUMMARIZE_WORKFLOW, SUMMARY_ATTEMPTS, 0)
    # A policy with a limit of its own (a run started before the unlimited one) keeps it.
    assert not crash_limit_reached(IMPLEMENT_BUILD, DISPATCH_ATTEMPTS, 3)
    assert not crash_limit_reached(PROCESS_TRIAGE_OUTPUT, 9, 0)
