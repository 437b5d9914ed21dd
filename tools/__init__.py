"""The operators' tools and the developer's commands: start a build (`start_build`,
`workflow_start` for the platform's dispatcher), decide and inspect runs (`ops`,
`time_report`), run the service locally (`run`, `devserver`, `synapse`, `demo`) and check
workflow code (`check_workflows`). Each is an entry point with `main(argv) -> int`.

May import: everything below the entry points, and the stand-ins (the demo plays the
agents with them). Nothing in the service imports tools; the stand-ins take
`tools.common`'s exit helper.
"""
