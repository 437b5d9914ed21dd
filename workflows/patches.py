"""The `workflow.patched` ids of both workflows, one per change to a command sequence.

A history recorded before a change replays because the new commands sit behind its id.
docs/patch-retirement.md says when each id can become `workflow.deprecate_patch`, and
what an operator checks first."""

from __future__ import annotations

PREPARE_PATCH = "prepare-pipeline"  # a local activity resolves agents before stage 1
EVENT_DRIVEN_WAIT_PATCH = "event-driven-block-wait"  # stage 7 without a polling activity
LOCAL_INLINE_PATCH = "local-inline-stages"  # stages 4 and 9 as local activities
ADOPTED_PATCH_PREFIX = "adopted-at-"  # the first stage an earlier worker's run enters here
# A summary that fails for good (not a full disk: that is retried until space returns)
# no longer fails the run: it ends with its outcome, and no summary path.
SUMMARY_FAILURE_PATCH = "summary-failure-keeps-outcome"
# Re-audits after fixes (reaudit_rounds > 0): flags fixed, audited again, at most N times.
REAUDIT_PATCH = "reaudit-rounds"
# An operator's "changes requested": the blocks go back to the target agent, then a re-audit.
CHANGES_REQUESTED_PATCH = "changes-requested"
# When the worker routes (AGENT_TASK_QUEUES set, learned before stage 1), each agent
# stage asks (a local activity, at its start) on which agent host's task queue it runs;
# stage 4 follows stage 3's host, and tasks left open are closed on their host. Decided
# once at the start, so a run keeps one shape.
STAGE_ROUTING_PATCH = "stage-routing"
# Agent stages watched by the workflow: a pickup limit (reminders), a work limit from the
# claim (the stage fails), the activity's own limit as the overall one.
PICKUP_LIMITS_PATCH = "agent-pickup-limits"
# BuildPlanWorkflow: the plan's own filing task is closed when the plan ends.
CLOSE_FILING_TASK_PATCH = "plan-closes-filing-task"
