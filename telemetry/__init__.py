"""What a build tells the world beyond logs: trace spans (`tracing`) and the platform's
event log (`event_log`, the agent-bus file the platform's dashboard reads).

May import: observability and the shared contract. Never workflows, activities,
decisions, startup or an entry point.
"""
