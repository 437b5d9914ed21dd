"""Every timeout and retry policy of both workflows, named in one place.

Agent work runs once (an agent's work is not repeatable by the worker): the activity's
start-to-close timeout is how long the agent has to call complete_activity.py. Only the
dispatch is retried, when no agent saw the task: a worker died before the task file was
written, or the task folder (or the audit folder) was full or read-only (DISPATCH_RETRY).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio.common import RetryPolicy

import vocabulary as stages
from exceptions import InvalidInputError, PhaseFailedError, TaskFileError, TriageInvalidError

# A full or read-only folder (DiskWriteError) is retried until space returns: first after
# a second, doubling, then every DISK_RETRY_MAX_INTERVAL, so a freed disk is used within
# that long. Any other failure of the same activity ends it after its *_ATTEMPTS
# attempts (the activity makes that failure non-retryable itself: a retry policy cannot
# count attempts per failure type).
DISK_RETRY_INITIAL_INTERVAL = timedelta(seconds=1)
DISK_RETRY_MAX_INTERVAL = timedelta(minutes=1)

ONCE = RetryPolicy(maximum_attempts=1)


@dataclass(frozen=True)
class StagePolicy:
    start_to_close: timedelta
    retry: RetryPolicy
    schedule_to_close: timedelta | None = None


# Agent work runs once: an agent's failure is non-retryable and a timeout cannot retry
# (schedule-to-close ends together with start-to-close). Every retry happens before any
# agent saw the work, and re-dispatches the same task id into the same file:
# - startup/recovery.py's, when a worker died before the task file existed;
# - a DiskWriteError: the task file (or request.md) could not be written;
# - any other failure of the dispatch, up to DISPATCH_ATTEMPTS attempts in all.
# Retries run within the stage's limit (schedule-to-close): time spent waiting for disk
# space is taken from the agent's time.
DISPATCH_ATTEMPTS = 3
DISPATCH_RETRY = RetryPolicy(initial_interval=DISK_RETRY_INITIAL_INTERVAL,
                             maximum_interval=DISK_RETRY_MAX_INTERVAL, maximum_attempts=0,
                             non_retryable_error_types=[PhaseFailedError.failure_type])


def agent_stage(limit: timedelta) -> StagePolicy:
    return StagePolicy(limit, DISPATCH_RETRY, schedule_to_close=limit)


def with_agent_limit(policy: StagePolicy, seconds: float | None) -> StagePolicy:
    """An agent stage's policy with the build's own time limit, if it sets one."""
    return policy if seconds is None else agent_stage(timedelta(seconds=seconds))


PREFAB = agent_stage(timedelta(hours=2))
IMPLEMENT = agent_stage(timedelta(hours=4))
SECURITY_AUDIT = agent_stage(timedelta(hours=4))
FLAG_FIXES = agent_stage(timedelta(hours=2))
CLOSE_BUILD = agent_stage(timedelta(hours=2))
BUILD_PHASE = agent_stage(timedelta(hours=4))


@dataclass(frozen=True)
class AgentLimits:
    """An agent stage's limits in runs started since the `agent-pickup-limits` patch
    (earlier runs keep the single limit above, counted from the task's write).

    pickup: task written -> claimed (`in-progress` in its file, or closed). Past it the
        build's notification channels are told again, at most PICKUP_REMINDERS times, one
        pickup limit apart; the stage keeps waiting.
    work: claimed -> done. Past it the agent has gone silent: the stage fails.
    overall: written -> done, whatever happened (the activity's schedule-to-close).
    """

    pickup: timedelta
    work: timedelta
    overall: timedelta


# Most platform tasks wait for a person to hand them to an agent (semi-auto, one run per
# agent): a lunch break must not fail a build, an agent that died must not hold it long.
PICKUP_LIMIT = timedelta(minutes=30)
OVERALL_LIMIT = timedelta(hours=24)
PICKUP_REMINDERS = 3
AGENT_LIMITS = {
    stage: AgentLimits(PICKUP_LIMIT, policy.start_to_close, OVERALL_LIMIT)
    for stage, policy in ((stages.PREFAB_SCAFFOLDING, PREFAB),
                          (stages.IMPLEMENT_BUILD, IMPLEMENT),
                          (stages.REQUEST_SECURITY_AUDIT, SECURITY_AUDIT),
                          (stages.APPLY_FLAG_FIXES, FLAG_FIXES),
                          (stages.CLOSE_BUILD, CLOSE_BUILD))
}


def agent_limits(stage: str, *, pickup_seconds: float | None = None,
                 work_seconds: float | None = None,
                 overall_seconds: float | None = None) -> AgentLimits:
    """A stage's limits, each replaced by the build's own where its input sets one."""
    base = AGENT_LIMITS.get(stage, AgentLimits(PICKUP_LIMIT, IMPLEMENT.start_to_close,
                                               OVERALL_LIMIT))

    def pick(seconds: float | None, default: timedelta) -> timedelta:
        return default if seconds is None else timedelta(seconds=seconds)

    return AgentLimits(pick(pickup_seconds, base.pickup), pick(work_seconds, base.work),
                       pick(overall_seconds, base.overall))


# One reminder that a task waits for pickup: every channel tried a few times inside the
# attempt (activities/notify.py); a failure is recorded, never retried by Temporal.
REMIND_PICKUP = StagePolicy(timedelta(minutes=2), ONCE)

# The triage file may land a little after the audit agent reports done.
TRIAGE = StagePolicy(
    timedelta(minutes=1),
    RetryPolicy(
        initial_interval=timedelta(minutes=2),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(minutes=15),
        maximum_attempts=5,
        non_retryable_error_types=[TriageInvalidError.failure_type,
                                   InvalidInputError.failure_type],
    ),
)

NOTIFY_BLOCKS = StagePolicy(
    timedelta(minutes=30),
    RetryPolicy(maximum_attempts=3, non_retryable_error_types=[TaskFileError.failure_type]),
)

# The summary is retried while its folder (or the task folder, where it closes tasks the
# pipeline left open) is full or read-only: the run stays at stage 9, its outcome in its
# status, until the summary is written. Other failures: SUMMARY_ATTEMPTS attempts.
SUMMARY_ATTEMPTS = 3
SUMMARY = StagePolicy(timedelta(minutes=1), RetryPolicy(
    initial_interval=DISK_RETRY_INITIAL_INTERVAL, maximum_interval=DISK_RETRY_MAX_INTERVAL,
    maximum_attempts=0))

# How long a block decision (file, chat) waits for its pipeline's Update to be answered.
DECISION_DELIVERY_TIMEOUT = timedelta(seconds=30)
# The look at the named run (is it a pipeline on this worker's queue?) before that.
DECISION_DESCRIBE_TIMEOUT = timedelta(seconds=10)
# Each call that applies a task closed with the platform's tools (describe, query,
# complete by id): one slow server must not hold the folder watch's other work.
TASK_CLOSE_RPC_TIMEOUT = timedelta(seconds=10)
# A task closed while the server is away (a restart, an upgrade) is applied again after
# 1 s, doubling up to 30 s: soon after the server is back, without a flood meanwhile.
TASK_CLOSE_RETRY_FIRST = timedelta(seconds=1)
TASK_CLOSE_RETRY_MAX = timedelta(seconds=30)
# At most one notice (task_notice signal) per run and task in this time, whatever a file
# in the folder is rewritten to say: each is a history event of that run.
TASK_NOTICE_INTERVAL = timedelta(seconds=60)
# The platform's event log: its lock is waited for this long (another writer holds it for
# one append), and an event's file work at most EVENT_IO_TIMEOUT; past either the event is
# dropped with a WARNING, never holding up the stage that emits it.
EVENT_LOG_LOCK_WAIT = timedelta(seconds=2)
EVENT_IO_TIMEOUT = timedelta(seconds=5)
# How long a rewrite of a task file waits for task-queue-mcp's lock on that task (it holds
# it for one read-modify-write, milliseconds); past that it goes on without.
TASK_LOCK_WAIT = timedelta(seconds=5)
# The folder watch, if it fails (a watch limit reached, a folder gone), starts again after
# 1 s, doubling up to a minute, while the worker serves.
WATCH_RESTART_FIRST = timedelta(seconds=1)
WATCH_RESTART_MAX = timedelta(seconds=60)

# Before stage 1 (a local activity): the worker's agent settings and a look for the
# originating task. Short: it reads one folder.
PREPARE = StagePolicy(timedelta(seconds=30), RetryPolicy(maximum_attempts=3))

RECORD_DECISION = StagePolicy(timedelta(minutes=1), RetryPolicy(maximum_attempts=5))

# At an agent stage's start (a local activity): the agent's host queue from the settings.
ROUTE = StagePolicy(timedelta(seconds=10), RetryPolicy(maximum_attempts=3))
# At the summary: agent tasks left open on an agent host, closed by that host's worker.
# Retried like the summary (a full folder waits for space); a host away for longer than
# schedule-to-close leaves its tasks open, said in the summary's events.
CLOSE_ON_HOST = StagePolicy(timedelta(minutes=1), RetryPolicy(
    initial_interval=DISK_RETRY_INITIAL_INTERVAL, maximum_interval=DISK_RETRY_MAX_INTERVAL,
    maximum_attempts=0), schedule_to_close=timedelta(hours=1))

# Stage 7 as recorded before decisions became event-driven (replay and runs already
# parked that way only): one attempt per poll; the retry policy is the poll loop.
BLOCK_CHECK_ATTEMPT = timedelta(seconds=30)


def block_poll_retry(poll_interval: timedelta) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=poll_interval,
        backoff_coefficient=1.0,
        maximum_interval=poll_interval,
        maximum_attempts=0,
        non_retryable_error_types=[TaskFileError.failure_type],
    )


# Headroom past the workflow's own deadline timer so the timer, not the activity, decides.
BLOCK_CHECK_HEADROOM = timedelta(minutes=5)

# v0.5.0's stage 7, as its histories record it: one activity for the whole wait,
# heartbeating while it polls, one attempt.
V050_BLOCK_CHECK_LIMIT = timedelta(days=7)
V050_BLOCK_CHECK_HEARTBEAT = timedelta(minutes=10)

# No workflow execution timeout: the longest legitimate wait (stage 7) is bounded by its
# own timer. complete_activity.py bounds every call it makes:
CLI_CONNECT_TIMEOUT = timedelta(seconds=8)
CLI_RPC_TIMEOUT = timedelta(seconds=5)
# tools/temporal-workflow-start.sh: the platform's dispatcher kills it after 30 s and
# counts that as a routing failure. Everything after start-up (Vault, connect, start)
# must end within this, leaving the interpreter's start-up and exit a margin.
DISPATCHER_START_DEADLINE = timedelta(seconds=20)

# The worker waiting for Temporal or Vault at start: the first retry after this, each
# next one twice as late, never later than the cap, so the worker polls within about
# 15 s of the server coming up (WORKER_STARTUP_WAIT_SECONDS bounds the whole wait; a
# WARNING per attempt is then 4 lines a minute).
STARTUP_RETRY_FIRST = timedelta(seconds=1)
STARTUP_RETRY_CAP = timedelta(seconds=15)
# While serving: how often the worker asks the server whether it is there, how long one
# answer may take, and how often an outage is reported again while it lasts.
SERVER_CHECK_INTERVAL = timedelta(seconds=5)
SERVER_CHECK_TIMEOUT = timedelta(seconds=5)
OUTAGE_REPORT_INTERVAL = timedelta(seconds=60)
