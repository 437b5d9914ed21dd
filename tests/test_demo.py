"""`make demo` (python -m tools.demo) runs the whole pipeline end to end, in one command,
under two minutes, and leaves nothing running or lying around."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.common import proc_start_ticks

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
STAGES = ["1/9 prefab_scaffolding", "2/9 implement_build", "3/9 request_security_audit",
          "4/9 process_triage_output", "5/9 apply_flag_fixes", "6/9 notify_blocks",
          "7/9 wait_for_block_resolution", "8/9 close_build", "9/9 summarize_workflow"]


def test_demo_runs_one_pipeline_end_to_end() -> None:
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tools.demo"], cwd=REPO, capture_output=True,
                            text=True, timeout=150)
    took = time.monotonic() - began
    out = result.stdout
    assert result.returncode == 0, f"demo failed:\n{out}\n{result.stderr}"
    assert took < 120, f"demo took {took:.0f}s"
    assert re.search(r"\[demo\] started workflow build-demo-service-[0-9a-f]{8}\n", out)
    assert "approve_blocks Update answered 'approved' (by demo-operator)" in out
    assert "COMPLETED: outcome partial, 9 stages" in out
    assert "agent stand-in finished: build_prefab, build_plan, security_audit, security_fix, " \
           "build_closeout" in out
    timeline = out.split("[demo] stage timeline:")[1]
    for stage in STAGES:
        assert re.search(rf"{re.escape(stage)}\s+completed", timeline), stage
    assert "approved_by_update  demo-operator: demo: risk accepted" in timeline
    assert out.rstrip().splitlines()[-1].startswith("[demo] PASSED in ")

    # Everything it started is stopped, and its temp folder is gone.
    pids = [int(pid) for pid in re.findall(r"(?:dev server|worker) pid (\d+)", out)]
    assert len(pids) == 2
    for pid in pids:
        assert f"pid {pid} stopped" in out
        assert proc_start_ticks(pid) is None, f"pid {pid} still running"
    folder = re.search(r"written to (\S+)/task-queue", out)
    assert folder
    assert not Path(folder.group(1)).exists()
