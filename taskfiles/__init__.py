"""The agent-file layer: every byte this service reads from or writes to a task folder.

Agents and the platform's tools write these folders, so every file is read as hostile:
`safe_io` (no link followed, no FIFO opened, reads capped, writes private and atomic
through a folder descriptor), `bounded_yaml` (YAML loaded within depth, node, expansion
and tag bounds; dumped without anchors), `documents` (the task document: its fields,
new tasks in both dialects, history), `lookup` (a task found by id, updated under a
per-id lock), `io_pool` (file work off the event loop, bounded in time and threads) and
`visible_text` (agent text made safe to show a person).

May import: the shared contract (vocabulary, policies, exceptions, models, config) and
itself. Never workflows, activities, decisions, startup or an entry point.
"""
