"""A full or read-only disk under each folder the worker writes, on real tmpfs mounts;
and a summary that can never be written, which must not lose the run's outcome.

Each folder (task folder, audit folder, summary folder, with the status and log files
beside the summaries) is a tiny tmpfs of its own, filled with zeros until ENOSPC or
remounted read-only. The write that needs it must fail its stage (or the summary)
retryably, naming the folder and the errno, leave no temp file, and keep the worker up;
once space returns the pipeline goes on from where it was and its summary is written.

Mounting needs root (CI runs the tests as root); without it these tests are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle

from config import load_config
from exceptions import DiskWriteError
from models import BuildPipelineInput, BuildPipelineResult, PipelineStatus, StageEvent
from observability import PrivateFileHandler
from standins.agents import (
    StandIn,
    complete_with_token,
    load_yaml,
    poll,
    poll_async,
    write_origin_task,
)
from taskfiles.documents import read_task
from taskfiles.lookup import write_task
from taskfiles.safe_io import write_private_atomic
from tests.conftest import PipelineEnv, make_env
from tests.worker_process import WorkerProcess
from vocabulary import (
    AUDIT_REQUESTS_DIR,
    EVENTS_QUERY,
    PREFAB_SCAFFOLDING,
    REQUEST_SECURITY_AUDIT,
    STATUS_QUERY,
    SUMMARIZE_WORKFLOW,
    TASK_SECURITY_AUDIT,
)

MOUNT_SIZE = "1m"
FILLER = "zeros"
NO_FINDINGS = "info:\n  - nothing to report\n"


class TinyDisk:
    """A tmpfs of MOUNT_SIZE at `path`: filled to the brim, freed, made read-only and
    writable again as the test asks; unmounted at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={MOUNT_SIZE},mode=0700",
                        "tmpfs", str(path)], check=True, capture_output=True, text=True)

    def fill(self) -> None:
        """Zeros until the kernel says ENOSPC, down to the last byte."""
        with open(self.path / FILLER, "ab", buffering=0) as filler:
            for chunk in (64 * 1024, 4096, 512, 1):
                with pytest.raises(OSError, match="No space left"):
                    _write_forever(filler, b"\0" * chunk)
        with pytest.raises(OSError, match="No space left"):
            (self.path / ".probe").write_bytes(b"x")
        (self.path / ".probe").unlink(missing_ok=True)

    def free(self) -> None:
        (self.path / FILLER).unlink()

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True,
                       capture_output=True, text=True)

    def temp_files(self) -> list[str]:
        """Every temp file left anywhere on the disk, dot files included."""
        return [os.path.join(root, name) for root, _dirs, names in os.walk(self.path)
                for name in names if name.endswith(".tmp")]

    def unmount(self) -> None:
        result = subprocess.run(["umount", str(self.path)], capture_output=True, text=True)
        if result.returncode != 0:  # something still holds it open: detach it anyway
            subprocess.run(["umount", "-l", str(self.path)], check=False)


def _write_forever(stream: Any, chunk: bytes) -> None:
    while True:
        stream.write(chunk)


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[dict[str, TinyDisk]]:
    """A tiny tmpfs per folder the worker writes (status and log files with the
    summaries); skipped, saying why, where mounting is impossible."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    mounted: dict[str, TinyDisk] = {}
    try:
        for name in ("task-queue", "artifacts", "summaries"):
            try:
                mounted[name] = TinyDisk(tmp_path / name)
            except subprocess.CalledProcessError as err:
                pytest.skip(f"cannot mount a tmpfs here: {err.stderr.strip()}")
        yield mounted
    finally:
        for disk in mounted.values():
            disk.unmount()


# --- the write itself ---------------------------------------------------------------------

def test_a_full_folder_keeps_the_old_file_whole_and_leaves_no_temp_file(
        disks: dict[str, TinyDisk]) -> None:
    disk = disks["summaries"]
    path = disk.path / "2026-12" / "run.yml"
    write_private_atomic(path, b"old: whole\n", base=disk.path)
    disk.fill()
    with pytest.raises(DiskWriteError) as caught:
        write_private_atomic(path, b"new: " + b"x" * 100_000 + b"\n", base=disk.path)
    assert str(caught.value).endswith(f"{path.parent}: No space left on device (ENOSPC)")
    assert caught.value.folder == str(path.parent)
    assert path.read_bytes() == b"old: whole\n"
    assert disk.temp_files() == []
    assert sorted(os.listdir(path.parent)) == ["run.yml"]
    disk.free()
    write_private_atomic(path, b"new: whole\n", base=disk.path)
    assert path.read_bytes() == b"new: whole\n"


def test_a_read_only_task_folder_names_the_folder_and_erofs(disks: dict[str, TinyDisk]) -> None:
    disk = disks["task-queue"]
    task_id = write_origin_task(disk.path, "ro-build")
    disk.remount("ro")
    try:
        task = load_yaml(next(disk.path.glob("*.yml")))
        with pytest.raises(DiskWriteError) as caught:
            write_task(disk.path, task)
        assert str(caught.value).endswith(f"{disk.path}: Read-only file system (EROFS)")
        assert caught.value.errno == errno.EROFS
        assert read_task(next(disk.path.glob("*.yml")))["id"] == task_id
        assert disk.temp_files() == []
    finally:
        disk.remount("rw")


def test_a_log_file_on_a_full_disk_drops_lines_warns_once_and_resumes(
        disks: dict[str, TinyDisk], caplog: pytest.LogCaptureFixture) -> None:
    disk = disks["summaries"]
    path = disk.path / "worker.jsonl"
    handler = PrivateFileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test_full_disk.worker")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("before")
        disk.fill()
        os.truncate(disk.path / FILLER, os.path.getsize(disk.path / FILLER) - 4096)
        logger.warning("x" * 20_000)  # one page of it fits: the disk cuts the line
        for number in range(5):
            logger.warning("lost %d", number)
        disk.free()
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "before"
    assert set(lines[1]) == {"x"}
    assert len(lines[1]) < 20_000
    assert lines[2:] == ["after"]  # not glued to the cut line
    warnings = [r for r in caplog.records if r.getMessage() == "log_file_not_written"]
    assert len(warnings) == 1, warnings
    assert warnings[0].__dict__["error"] == f"{disk.path}: No space left on device (ENOSPC)"
    resumed = [r for r in caplog.records if r.getMessage() == "log_file_written_again"]
    assert [r.__dict__["dropped_records"] for r in resumed] == [6]


# --- pipelines through a real worker process ----------------------------------------------

def pipeline_input(build_name: str, tmp_path: Path) -> BuildPipelineInput:
    return BuildPipelineInput(build_name=build_name, plan_path=str(tmp_path / "plan.md"),
                              task_id=str(uuid.uuid4()), target_agent="builder")


async def pending_failure(handle: WorkflowHandle, activity: str) -> tuple[str, str, int]:
    """(message, failure type, attempt) of `activity`'s last failure while it is pending;
    empty while it has none."""
    description = await handle.describe()
    for pending in description.raw_description.pending_activities:
        if pending.activity_type.name == activity and pending.HasField("last_failure"):
            failure = pending.last_failure
            return (failure.message, failure.application_failure_info.type, pending.attempt)
    return ("", "", 0)


async def wait_for_pending_failure(handle: WorkflowHandle, activity: str
                                   ) -> tuple[str, str, int]:
    async def failed() -> tuple[str, str, int] | None:
        found = await pending_failure(handle, activity)
        return found if found[0] else None

    return await poll_async(failed, timeout=30, what=f"a failure of {activity}")


class Rig:
    """One real worker process on the tiny disks, and the stand-in playing its agents."""

    def __init__(self, tmp_path: Path, address: str, client: Client) -> None:
        summaries = tmp_path / "summaries"
        self.env = make_env(tmp_path, address, LOG_FILE=str(summaries / "worker.jsonl"),
                            WORKER_STATUS_FILE=str(summaries / "status.json"))
        self.config = load_config(self.env)
        self.client = client
        self.worker = WorkerProcess(self.env, tmp_path / "worker-stdout.log")
        self.standin = StandIn(self.config.task_queue_dir, self.config.audit_dir, self.env,
                               tmp_path / "work", triage=lambda _build: NO_FINDINGS)
        self.stop = asyncio.Event()
        self.playing: asyncio.Task[None] | None = None

    async def start(self, pipeline: BuildPipelineInput) -> WorkflowHandle:
        self.worker.start()
        await asyncio.to_thread(self.worker.wait_ready)
        self.playing = asyncio.create_task(self.standin.serve(self.stop))
        return await self.client.start_workflow(
            "BuildPipelineWorkflow", pipeline, id=f"disk-{pipeline.build_name}-{uuid.uuid4()}",
            task_queue=self.config.task_queue, result_type=BuildPipelineResult)

    def alive(self) -> bool:
        assert self.worker.process is not None
        return self.worker.process.poll() is None

    def stdout_records(self, event: str) -> list[dict[str, Any]]:
        return [record for record in self.worker.log_records() if record.get("event") == event]

    async def finish(self, handle: WorkflowHandle) -> BuildPipelineResult:
        result = await asyncio.wait_for(handle.result(), 60)
        assert self.alive(), self.worker.tail()
        return result

    async def close(self) -> None:
        self.stop.set()
        if self.playing is not None:
            await self.playing
        await asyncio.to_thread(self.worker.stop)


@pytest.fixture
async def rig(tmp_path: Path, temporal_address: str, client: Client,
              disks: dict[str, TinyDisk]) -> Any:
    assert set(disks) == {"task-queue", "artifacts", "summaries"}  # mounted before the worker
    made = Rig(tmp_path, temporal_address, client)
    try:
        yield made
    finally:
        await made.close()


def assert_summary(result: BuildPipelineResult, outcome: str = "success") -> dict[str, Any]:
    assert result.outcome == outcome
    assert result.summary_path is not None
    summary = load_yaml(Path(result.summary_path))
    assert summary["outcome"] == outcome
    assert summary["stages_completed"][-1] == SUMMARIZE_WORKFLOW
    return summary


@pytest.mark.slow
async def test_a_full_task_folder_holds_stage_1_until_space_returns(
        rig: Rig, disks: dict[str, TinyDisk], tmp_path: Path) -> None:
    disk = disks["task-queue"]
    disk.fill()
    handle = await rig.start(pipeline_input("full-queue", tmp_path))
    message, failure_type, _ = await wait_for_pending_failure(handle, PREFAB_SCAFFOLDING)
    assert failure_type == DiskWriteError.failure_type
    assert message.endswith(f"{disk.path}: No space left on device (ENOSPC)"), message
    assert disk.temp_files() == []
    assert sorted(os.listdir(disk.path)) == [FILLER]  # no task file, whole or half
    # Failed attempts beyond DISPATCH_ATTEMPTS do not end the stage: the disk is waited out.
    await poll_async(lambda: _attempt_above(handle, 3), timeout=30,
                     what="a fourth dispatch attempt")
    assert rig.alive(), rig.worker.tail()
    disk.free()
    result = await rig.finish(handle)
    assert_summary(result)
    assert disk.temp_files() == []


async def _attempt_above(handle: WorkflowHandle, attempts: int) -> bool:
    return (await pending_failure(handle, PREFAB_SCAFFOLDING))[2] > attempts


@pytest.mark.slow
async def test_a_read_only_audit_folder_holds_stage_3_before_any_agent_sees_it(
        rig: Rig, disks: dict[str, TinyDisk], tmp_path: Path) -> None:
    disk = disks["artifacts"]
    disk.remount("ro")
    handle = await rig.start(pipeline_input("ro-audit", tmp_path))
    message, failure_type, _ = await wait_for_pending_failure(handle, REQUEST_SECURITY_AUDIT)
    assert failure_type == DiskWriteError.failure_type
    assert message.endswith(f"{disk.path}: Read-only file system (EROFS)"), message
    assert disk.temp_files() == []
    # request.md comes first: without it no audit task is handed out.
    assert not [path for path in rig.config.task_queue_dir.glob("*.yml")
                if load_yaml(path)["task_type"] == TASK_SECURITY_AUDIT]
    assert rig.alive(), rig.worker.tail()
    disk.remount("rw")
    result = await rig.finish(handle)
    assert_summary(result)
    request = disk.path / AUDIT_REQUESTS_DIR / "ro-audit" / "request.md"
    assert request.read_text().startswith("# Security audit request: ro-audit")
    assert disk.temp_files() == []


@pytest.mark.slow
async def test_a_full_summary_disk_keeps_the_outcome_and_the_worker_up(
        rig: Rig, disks: dict[str, TinyDisk], tmp_path: Path) -> None:
    """The summaries, the status file and the log file share one full disk."""
    disk = disks["summaries"]
    disk.fill()
    handle = await rig.start(pipeline_input("full-summary", tmp_path))
    waits = await poll(lambda: [r for r in rig.stdout_records("stage_waits_for_disk")
                                if r.get("activity") == SUMMARIZE_WORKFLOW],
                       timeout=45, what="the summary waiting for disk space")
    assert waits[0]["error"].endswith("No space left on device (ENOSPC)"), waits[0]
    assert waits[0]["folder"].startswith(str(disk.path)), waits[0]
    # The outcome is the run's, at stage 9, while the summary waits.
    status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
    assert (status.stage, status.outcome) == (SUMMARIZE_WORKFLOW, "success")
    status_warnings = rig.stdout_records("status_file_not_written")
    assert status_warnings, "no status_file_not_written warning"
    assert "(ENOSPC)" in status_warnings[0]["error"], status_warnings
    log_warnings = rig.stdout_records("log_file_not_written")
    assert len(log_warnings) == 1, log_warnings  # one a minute, however many records
    assert "(ENOSPC)" in log_warnings[0]["error"]
    assert disk.temp_files() == []
    assert rig.alive(), rig.worker.tail()
    disk.free()
    result = await rig.finish(handle)
    summary = assert_summary(result)
    assert summary["workflow_id"] == handle.id
    assert disk.temp_files() == []
    await poll(lambda: _log_events(disk.path / "worker.jsonl"), what="the log file's lines")
    await asyncio.to_thread(rig.worker.stop)
    assert json.loads((disk.path / "status.json").read_text())["state"] == "stopped"
    events = _log_events(disk.path / "worker.jsonl")
    assert "log_file_written_again" in events, events[-5:]


def _log_events(path: Path) -> list[str]:
    """Events of LOG_FILE; every line must be one whole JSON document."""
    if not path.exists():
        return []
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


# --- a summary that can never be written ---------------------------------------------------

async def test_a_summary_that_cannot_be_written_still_ends_the_run_with_its_outcome(
        pipeline: PipelineEnv, tmp_path: Path) -> None:
    """Not a full disk (that is waited out): a link planted where the summary goes is
    refused on each of SUMMARY_ATTEMPTS attempts; the run still ends with its outcome."""
    workflow_id = f"summary-link-{uuid.uuid4()}"
    elsewhere = tmp_path / "elsewhere.yml"
    elsewhere.write_text("not the worker's\n")
    for moment in (datetime.now(UTC), datetime.now(UTC) + timedelta(minutes=1)):
        folder = pipeline.summary_dir / moment.strftime("%Y-%m")
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            (folder / f"{workflow_id}.yml").symlink_to(elsewhere)

    async def complete(_path: Path, task: dict[str, Any], message: str) -> None:
        await complete_with_token(pipeline.client, task, "success", message)

    standin = StandIn(pipeline.queue_dir, pipeline.audit_dir, pipeline.env, tmp_path / "work",
                      workflow_id=workflow_id, triage=lambda _build: NO_FINDINGS,
                      complete=complete)
    handle = await pipeline.start("BuildPipelineWorkflow", pipeline_input("link", tmp_path),
                                  workflow_id, result_type=BuildPipelineResult)
    await standin.run()
    result = await asyncio.wait_for(handle.result(), 30)
    assert (result.outcome, result.status, result.summary_path) == ("success", "complete", None)
    events = await handle.query(EVENTS_QUERY, result_type=list[StageEvent])
    failed = [event for event in events
              if (event.stage, event.event) == (SUMMARIZE_WORKFLOW, "failed")]
    assert len(failed) == 1, events
    assert "is a symlink" in failed[0].detail, failed[0]
    status = await handle.query(STATUS_QUERY, result_type=PipelineStatus)
    assert any(warning.startswith("summary not written:") for warning in status.warnings)
    assert elsewhere.read_text() == "not the worker's\n"
