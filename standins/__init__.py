"""STAND-INS, not the real thing: the other side of a pipeline, played for `make demo`,
the benchmark, the history recorder and the tests.

`agents` plays the coding agents (finds a task file, completes its stage, writes a
triage); `task_tools` plays the platform's task tools and one dispatcher tick, built
strictly from PROTOCOL.md's facts and refusing what they refuse, with the same words;
`platform_play` plays agents and operators through those tools only.

May import: anything below the entry points (the shared contract, the agent-file layer,
models); the demo, the bench and the tests import it. The worker never does.
"""
