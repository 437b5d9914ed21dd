"""What the platform's dispatcher hands this worker: its start request for a build
(`start_request`, mapped to this worker's workflow inputs) and its roster of agents it
can launch (`roster`).

May import: the agent-file layer and the shared contract. Never workflows, activities,
decisions, startup or an entry point.
"""
