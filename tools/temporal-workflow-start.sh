#!/bin/sh
# The platform dispatcher's start script: <workflow_type> <workflow_id> <input_json>
# (tools/workflow_start.py says what it does). Install by a link at the path the
# dispatcher calls:  ln -s <repo>/tools/temporal-workflow-start.sh ~/scripts/
# The link is resolved to find the repository and its .venv.
r=$(dirname -- "$(dirname -- "$(readlink -f -- "$0")")") || exit 2
PYTHONPATH="$r" exec "${BUILD_WORKER_PYTHON:-$r/.venv/bin/python}" -m tools.workflow_start "$@"
