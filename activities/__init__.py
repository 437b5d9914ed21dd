"""Activities: every piece of I/O the workflows need (task files, notifications, the
platform's event log, the clock).

One module per concern: `build_pipeline_activities` (every activity, each a typed method
implementing its contract in workflows/contracts.py), `dispatch` (write an agent's task
file, then suspend), `build_phase` (a plan phase's payload fields), `notify` and
`matrix` (block notices), `triage`, `run_link`, `platform_events`, `failures` (how a
writing activity fails) and `legacy_args` (v0.5.0's argument shapes, decoded here only).

May import: workflows' pure helpers (instruction text, timings), the agent-file layer,
telemetry, dispatcher and the shared contract. Never decisions, startup or an entry point.
"""
