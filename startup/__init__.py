"""What a worker does as it starts, before and beside serving.

`recovery` hands back work a killed worker on this host left half done, `adoption`
takes over runs an earlier worker (v0.5.0 included) started, and `reachability` rides
out a Temporal server or Vault that is late or goes away.

May import: decisions (closed tasks found while recovering), activities, workflows'
constants, the agent-file layer and the shared contract. Only entry points import it.
"""
