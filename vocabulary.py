"""The names the service, its tools, its tests and its docs share, each defined once.

A name here crosses a boundary: a Temporal history (activity types; Update, query and
signal names), a task file an agent reads (task types, statuses), the folder layout
agents and operators rely on, or a table in the manual / AGENTS.md
(tests/test_vocabulary.py checks those tables against this module). Import it; never
retype a value. Failure types are classes: exceptions.py.
"""

from __future__ import annotations

from typing import Final

# --- stages: the nine, in order; each is also the name of the activity that runs it ---
PREFAB_SCAFFOLDING: Final = "prefab_scaffolding"
IMPLEMENT_BUILD: Final = "implement_build"
REQUEST_SECURITY_AUDIT: Final = "request_security_audit"
PROCESS_TRIAGE_OUTPUT: Final = "process_triage_output"
APPLY_FLAG_FIXES: Final = "apply_flag_fixes"
NOTIFY_BLOCKS: Final = "notify_blocks"
WAIT_FOR_BLOCK_RESOLUTION: Final = "wait_for_block_resolution"
CLOSE_BUILD: Final = "close_build"
SUMMARIZE_WORKFLOW: Final = "summarize_workflow"

STAGES: Final = (PREFAB_SCAFFOLDING, IMPLEMENT_BUILD, REQUEST_SECURITY_AUDIT,
                 PROCESS_TRIAGE_OUTPUT, APPLY_FLAG_FIXES, NOTIFY_BLOCKS,
                 WAIT_FOR_BLOCK_RESOLUTION, CLOSE_BUILD, SUMMARIZE_WORKFLOW)
# Attributes of the trace spans of a build (telemetry/tracing.py), for queries in a trace backend.
SPAN_BUILD_NAME: Final = "build.name"
SPAN_BUILD_STAGE: Final = "build.stage"
STAGE_NUMBERS: Final = {stage: number for number, stage in enumerate(STAGES, start=1)}
TOTAL_STAGES: Final = len(STAGES)

# Stages that hand work to an agent through a task file and wait for complete_activity.py.
AGENT_STAGES: Final = (PREFAB_SCAFFOLDING, IMPLEMENT_BUILD, REQUEST_SECURITY_AUDIT,
                       APPLY_FLAG_FIXES, CLOSE_BUILD)
# Stages the worker finishes itself, without an agent.
INLINE_STAGES: Final = (PROCESS_TRIAGE_OUTPUT, NOTIFY_BLOCKS, WAIT_FOR_BLOCK_RESOLUTION,
                        SUMMARIZE_WORKFLOW)

# --- activities that are not stages ---
PREPARE_PIPELINE: Final = "prepare_pipeline"  # before stage 1: agents, originating task
RECORD_DECISION: Final = "record_block_decision"  # stage 7's decision into the task file
ROUTE_STAGE: Final = "route_stage"  # at an agent stage's start: its agent's host queue
# At the summary: agent tasks left open on an agent host, closed there.
CLOSE_OPEN_TASKS: Final = "close_open_tasks"
BUILD_PHASE: Final = "build_phase"  # one phase of a BuildPlanWorkflow
# An agent stage's task still unclaimed past its pickup limit: its channels are told again.
REMIND_PICKUP: Final = "remind_pickup"
# A plan's end: its filing task closed (platform dialect), as a pipeline's summary does.
CLOSE_ORIGINATING_TASK: Final = "close_originating_task"

# What startup/recovery.py does with a pending activity whose worker died (every activity the
# worker registers is in exactly one of these; tests/test_recovery.py checks it).
# Agent activities: dispatched again only if the agent never got its task file.
AGENT_ACTIVITIES: Final = (*AGENT_STAGES, BUILD_PHASE)
# Inline activities: idempotent, so always run again. Triage and summary run as local
# activities in runs started since the `local-inline-stages` patch; only runs begun
# before it show them pending on the server.
INLINE_ACTIVITIES: Final = (*INLINE_STAGES, RECORD_DECISION, CLOSE_OPEN_TASKS, REMIND_PICKUP)
# Never recovered: a local activity runs inside the workflow task and is never pending on
# the server; Temporal retries the workflow task itself.
UNRECOVERED_ACTIVITIES: Final = (PREPARE_PIPELINE, ROUTE_STAGE, CLOSE_ORIGINATING_TASK)

# --- workflow types ---
BUILD_PIPELINE_WORKFLOW: Final = "BuildPipelineWorkflow"
BUILD_PLAN_WORKFLOW: Final = "BuildPlanWorkflow"
WORKFLOW_TYPES: Final = (BUILD_PIPELINE_WORKFLOW, BUILD_PLAN_WORKFLOW)

# --- task types: what a task file's `task_type` says ---
TASK_BUILD_REQUEST: Final = "build_request"  # an originating task written by tools
TASK_BUILD_PREFAB: Final = "build_prefab"
TASK_BUILD_PLAN: Final = "build_plan"
TASK_SECURITY_AUDIT: Final = "security_audit"
TASK_SECURITY_FIX: Final = "security_fix"
TASK_BUILD_CLOSEOUT: Final = "build_closeout"
TASK_BUILD_PHASE: Final = "build_phase"
# The platform's task asking its dispatcher to start a workflow (PROTOCOL.md §5.4); the
# filing task becomes the pipeline's originating task.
TASK_WORKFLOW: Final = "workflow"
# The task type of each agent stage's task file.
STAGE_TASK_TYPES: Final = {PREFAB_SCAFFOLDING: TASK_BUILD_PREFAB, IMPLEMENT_BUILD: TASK_BUILD_PLAN,
                           REQUEST_SECURITY_AUDIT: TASK_SECURITY_AUDIT,
                           APPLY_FLAG_FIXES: TASK_SECURITY_FIX, CLOSE_BUILD: TASK_BUILD_CLOSEOUT}
# Every task type the worker writes for an agent (the schema's task_type enum).
AGENT_TASK_TYPES: Final = (*STAGE_TASK_TYPES.values(), TASK_BUILD_PHASE)

# --- task file dialects (TASK_FILE_DIALECT) ---
# `platform`: the words and formats of the platform's task tools that share the folder
# (task-queue-mcp, task-dispatcher, the queue bot); `v050`: v0.5.0's own.
DIALECT_PLATFORM: Final = "platform"
DIALECT_V050: Final = "v050"
DIALECTS: Final = (DIALECT_PLATFORM, DIALECT_V050)
# The platform's task types our tasks use; the stage's own name goes in payload.stage.
PLATFORM_TASK_BUILD: Final = "build"
PLATFORM_TASK_AUDIT: Final = "audit"
PLATFORM_TASK_FIX: Final = "fix"
PLATFORM_TASK_DOCS: Final = "docs"
# v0.5.0 task type -> the platform's task type, in the platform dialect.
PLATFORM_TASK_TYPES: Final = {TASK_BUILD_PREFAB: PLATFORM_TASK_BUILD,
                              TASK_BUILD_PLAN: PLATFORM_TASK_BUILD,
                              TASK_SECURITY_AUDIT: PLATFORM_TASK_AUDIT,
                              TASK_SECURITY_FIX: PLATFORM_TASK_FIX,
                              TASK_BUILD_CLOSEOUT: PLATFORM_TASK_DOCS,
                              TASK_BUILD_PHASE: PLATFORM_TASK_BUILD}
# The platform's workflow modes (TASK_WORKFLOW_MODE); the dispatcher acts on them.
WORKFLOW_MODES: Final = ("semi-auto", "auto", "manual-then-auto")

# --- task statuses: a task file's `status` ---
SUBMITTED: Final = "submitted"
IN_PROGRESS: Final = "in-progress"
COMPLETED: Final = "completed"
FAILED: Final = "failed"
INPUT_REQUIRED: Final = "input-required"  # v050: an originating task parked on a decision
APPROVED: Final = "approved"
REJECTED: Final = "rejected"
CANCELLED: Final = "cancelled"
EXPIRED: Final = "expired"
# The platform's own statuses besides the shared ones (PROTOCOL.md §2).
PENDING_APPROVAL: Final = "pending-approval"  # platform: an originating task parked on a decision
PARKED: Final = "parked"
ROUTING_FAILED: Final = "routing-failed"
# The statuses an agent task can have (the schema's status enum).
AGENT_TASK_STATUSES: Final = (SUBMITTED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, EXPIRED)
# Every status the platform's tools know; the platform dialect writes no other.
PLATFORM_STATUSES: Final = (SUBMITTED, APPROVED, PENDING_APPROVAL, IN_PROGRESS, PARKED,
                            ROUTING_FAILED, COMPLETED, FAILED, CANCELLED)
TERMINAL_STATUSES: Final = frozenset({COMPLETED, FAILED, CANCELLED, EXPIRED})
OPEN_STATUSES: Final = frozenset({SUBMITTED, IN_PROGRESS})
# An agent task of the platform dialect nobody has finished: every non-terminal status.
PLATFORM_OPEN_STATUSES: Final = frozenset(PLATFORM_STATUSES) - TERMINAL_STATUSES
# The statuses that say an agent has taken its task (pickup).
CLAIMED_STATUSES: Final = frozenset({IN_PROGRESS, COMPLETED, FAILED})
REJECTING_STATUSES: Final = frozenset({REJECTED, CANCELLED, FAILED})
DECIDING_STATUSES: Final = REJECTING_STATUSES | {APPROVED}

# --- block decisions ---
# The block decision beside approved and rejected (models.Decision): the blocks go back
# to the target agent with a note, then through audit and triage again.
CHANGES_REQUESTED: Final = "changes_requested"
# The decision Updates, one per kind of decision (decisions/delivery.py sends them).
APPROVE_BLOCKS_UPDATE: Final = "approve_blocks"
REJECT_BLOCKS_UPDATE: Final = "reject_blocks"
REQUEST_CHANGES_UPDATE: Final = "request_changes"
# Originating task fields an operator writes beside `status` to decide block by block
# (and CHANGES_REQUESTED, the note of a changes request, under its own name).
BLOCK_VERDICTS_FIELD: Final = "block_verdicts"

# --- folders ---
AUDIT_REQUESTS_DIR: Final = "audit-requests"  # under TEMPORAL_AUDIT_DIR, one folder per build
# In a build's audit folder: round-2/, round-3/, … hold each re-audit's request.md,
# audit.md and triage-output.yml (the first audit's stay in the build's folder).
AUDIT_ROUND_DIR_PREFIX: Final = "round-"
ARCHIVE_DIR: Final = "archive"  # under TASK_QUEUE_DIR: tasks moved aside, still searched
DEAD_LETTERS_DIR: Final = "dead-letters"  # under TASK_QUEUE_DIR: tasks nobody could take
TASK_SEARCH_SUBDIRS: Final = (ARCHIVE_DIR, DEAD_LETTERS_DIR)
LOCKS_DIR: Final = ".locks"  # under TASK_QUEUE_DIR: task-queue-mcp's lock per task id
# Top-level key of an originating task (platform dialect): the run that works on it.
RUN_LINK: Final = "temporal_run"

# --- queries and signals (the Updates are under block decisions) ---
STATUS_QUERY: Final = "get_status"  # both workflows: where a run stands
EVENTS_QUERY: Final = "get_events"  # BuildPipelineWorkflow: its events so far
# BuildPipelineWorkflow: something about one of its task files the folder watch saw
# (a routing failure, an unreadable decision file); shown as a warning.
TASK_NOTICE_SIGNAL: Final = "task_notice"
# BuildPipelineWorkflow: an operator holds the next stage back, or lets it go on.
PAUSE_SIGNAL: Final = "pause"
RESUME_SIGNAL: Final = "resume"
# BuildPipelineWorkflow: a worker that takes over runs an earlier worker started
# (startup/adoption.py) says so in the run's events.
ADOPT_SIGNAL: Final = "adopt"

# --- queue ---
DEFAULT_TASK_QUEUE: Final = "helm-build"

# --- worker roles (WORKER_ROLE) ---
ROLE_ALL: Final = "all"  # workflows and every activity
ROLE_AGENT_HOST: Final = "agent-host"  # only the activities bound to this host's folders
WORKER_ROLES: Final = (ROLE_ALL, ROLE_AGENT_HOST)

# --- the platform's event log (agent-bus; task-queue/PROTOCOL.md §7) ---
BUS_LOGS_DIR: Final = "logs"  # under AGENT_BUS_COMMS_DIR: <UTC date>-cross-agent.jsonl
BUS_SCOPE: Final = "cross-agent"  # the scope of every event the worker writes
# The event types the worker writes, each one of the platform's declared cross-agent types.
EVENT_BUILD_STARTED: Final = "build.started"
EVENT_HANDOFF_CREATED: Final = "handoff.created"  # an agent stage's task file written
EVENT_AUDIT_REQUESTED: Final = "audit.requested"  # stage 3's task file written
EVENT_AUDIT_COMPLETED: Final = "audit.completed"  # stage 4 read the triage
EVENT_SECURITY_FINDING: Final = "security.finding"  # one per block and per flag
EVENT_HANDOFF_COMPLETED: Final = "handoff.completed"  # the operators' block decision
EVENT_BUILD_COMPLETED: Final = "build.completed"  # the summary written, with the outcome
BUS_EVENT_TYPES: Final = (EVENT_BUILD_STARTED, EVENT_HANDOFF_CREATED, EVENT_AUDIT_REQUESTED,
                          EVENT_AUDIT_COMPLETED, EVENT_SECURITY_FINDING,
                          EVENT_HANDOFF_COMPLETED, EVENT_BUILD_COMPLETED)

# --- worker states: `state` in WORKER_STATUS_FILE ---
WORKER_WAITING: Final = "waiting"  # Temporal or Vault unreachable; `reason` says why
WORKER_READY: Final = "ready"
WORKER_STOPPING: Final = "stopping"
WORKER_STOPPED: Final = "stopped"
