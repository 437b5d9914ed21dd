"""What a build tells the world beyond logs: trace spans (`tracing`) and the platform's
event log (`event_log`, the agent-bus file the platform's dashboard reads), and the build
an activity works for (`context`), which log lines and spans both carry.

May import: the shared contract (vocabulary, policies, exceptions, models, config).
Observability installs the tracing interceptor; telemetry never imports observability.
"""
