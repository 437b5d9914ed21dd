"""How a block decision or a closed agent task reaches a waiting pipeline.

One delivery (`delivery`: the approve/reject Update, sent once per decision), and the
paths that feed it: the task folder watcher (`file_watcher`: decisions written into an
originating task file, and agent tasks closed with the platform's tools, applied by
`closed_tasks`) and the chat listener (`chat_listener`: approvers' replies in the Matrix
room, through the Matrix client block notices use, `activities.matrix`).

May import: activities (the Matrix client, v0.5.0 argument decoding), workflows' pure
helpers, the agent-file layer and the shared contract. Never startup or an entry point.
"""
