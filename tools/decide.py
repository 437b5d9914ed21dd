"""tools/approve-build and tools/reject-build: decide a pipeline's security blocks.

    tools/approve-build --workflow-id ID [--note TEXT] [--by NAME]
    tools/reject-build  --workflow-id ID --reason TEXT [--by NAME]

Sends the approve_blocks / reject_blocks Update. The workflow refuses it (exit 1, with
its reason) unless it is parked at stage 7 waiting on a decision. On success the
pipeline resumes (approve: close_build is dispatched; reject: it ends as rejected) and
the originating task file's history records who decided and why.

Exit codes: 0 decision recorded · 1 refused by the workflow (not waiting on blocks,
already decided) · 2 usage · 3 workflow not found or already closed · 4 cannot connect.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from datetime import timedelta
from typing import Any

from models import BlockDecision
from tools.ops import (
    EXIT_ATTENTION,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    ToolError,
    connect_client,
    not_found,
    run_tool,
)

UPDATES = {"approve": "approve_blocks", "reject": "reject_blocks"}
UPDATE_TIMEOUT = timedelta(seconds=30)


def parse_args(action: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"tools/{action}-build",
        description=f"{action.capitalize()} the security blocks of a parked pipeline "
                    f"(the {UPDATES[action]} Update).",
        epilog="exit codes: 0 recorded, 1 refused by the workflow, 2 usage, 3 workflow not "
               "found or closed, 4 cannot connect")
    parser.add_argument("--workflow-id", required=True)
    if action == "approve":
        parser.add_argument("--note", default="", help="why (recorded in the task history)")
    else:
        parser.add_argument("--reason", required=True,
                            help="why (recorded in the task history)")
    parser.add_argument("--by", default=None, help="who decides (default: your user name)")
    return parser.parse_args(argv)


async def decide(client: Any, action: str, workflow_id: str, note: str, by: str) -> str:
    """Send the Update; return the workflow's answer ("approved" / "rejected")."""
    from temporalio.client import WorkflowUpdateFailedError
    from temporalio.service import RPCError

    try:
        decision = BlockDecision(note=note, decided_by=by)
    except ValueError as err:
        raise ToolError(f"invalid decision: {str(err).splitlines()[0]}", EXIT_USAGE) from None
    handle = client.get_workflow_handle(workflow_id)
    try:
        return await handle.execute_update(UPDATES[action], decision, result_type=str,
                                           rpc_timeout=UPDATE_TIMEOUT)
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        reason = getattr(cause, "message", None) or str(cause)
        raise ToolError(f"refused by {workflow_id}: {reason}", EXIT_ATTENTION) from None
    except RPCError as err:
        if not_found(err):
            raise ToolError(f"workflow {workflow_id!r} not found or already closed",
                            EXIT_NOT_FOUND) from None
        raise ToolError(f"Temporal error: {err.message.splitlines()[0][:200]}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in UPDATES:
        print("decide: first argument must be 'approve' or 'reject'", file=sys.stderr)
        return EXIT_USAGE
    action = argv[0]
    try:
        args = parse_args(action, argv[1:])
    except SystemExit as exit_request:
        return EXIT_USAGE if exit_request.code not in (0, None) else EXIT_OK
    note = args.note if action == "approve" else args.reason
    by = args.by or getpass.getuser()

    def call() -> int:
        async def go() -> str:
            return await decide(await connect_client(), action, args.workflow_id, note, by)

        answer = asyncio.run(go())
        print(f"{action}-build: {args.workflow_id} {answer} by {by}")
        return EXIT_OK

    return run_tool(f"{action}-build", call)


if __name__ == "__main__":
    from tools.ops import exit_process

    exit_process(main())
