"""The shared-memory queues of vLLM engines that die without a shutdown.

A vLLM engine's processes (engine core, workers) talk over two ``/dev/shm/psm_*`` queues (up to
250 MB each) that only a clean ``engine_core.shutdown`` unlinks. An engine killed with its owner
(SIGKILL, an OOM kill, ``ray.kill``; Ray also kills an actor's child processes when the actor
ends, e.g. a Ray Data stage's) leaves them behind, and they pile up on a node until Ray's memory
monitor kills jobs. So ``avar_ray.engines.start_llm`` writes each engine's processes and queue
names, and the directory of its ZeroMQ IPC sockets (``start_llm`` gives each engine its own:
vLLM never unlinks those, 7 socket files per engine start, even after a clean shutdown), into
REGISTRY (on the same tmpfs: a reboot clears both) and starts a janitor, a detached
process (``python engine_janitor.py RECORD``, outside the owner's process tree, so that nothing
that kills the owner kills it), which removes them once the engine's processes are all gone
and exits; ``stop_llm`` does the same at once. Every engine start also sweeps the records of
engines long dead (their janitor killed too). A queue is never unlinked while a process of its
engine runs. No project imports here: the janitor starts in milliseconds.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REGISTRY = Path("/dev/shm/avar_ray_engines")
POLL_S = 1.0

log = logging.getLogger(__name__)


def pid_namespace() -> str:
    """Pids mean something only in their namespace (containers may share /dev/shm)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie is not: it has exited and only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def write_record(owner: int, pids: list[int], segments: list[str], dirs: tuple[str, ...] = (),
                 record: Path | None = None) -> Path:
    """Record an engine's processes (those that map its queues), its queues and the
    directories only it uses (its IPC sockets); ``record``: rewrite that record (its janitor
    reads the new one at its next poll)."""
    REGISTRY.mkdir(exist_ok=True)
    record = record or REGISTRY / f"{owner}-{pids[0]}.json"
    part = record.with_suffix(".part")
    part.write_text(json.dumps({"pidns": pid_namespace(), "pids": pids, "segments": segments, "dirs": list(dirs)}))
    os.replace(part, record)
    return record


def release(record: Path) -> bool:
    """Unlink the record's queues, its directories and the record if none of its engine's
    processes runs (in this pid namespace); True once the record is gone."""
    try:
        entry = json.loads(record.read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    if entry.get("pidns") != pid_namespace() or any(alive(p) for p in entry["pids"]):
        return False
    for path in entry["segments"]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    for path in entry.get("dirs", ()):
        shutil.rmtree(path, ignore_errors=True)
    record.unlink(missing_ok=True)
    return True


def sweep() -> int:
    """Release every record whose engine is gone; returns how many went."""
    gone = [r for r in sorted(REGISTRY.glob("*.json")) if release(r)]  # release: a record gone meanwhile is fine
    if gone:
        log.warning("removed the shared-memory queues of %d vLLM engines that died without a shutdown", len(gone))
    return len(gone)


def start_janitor(record: Path) -> None:
    """Start this file as a detached process watching ``record`` (``sh`` backgrounds it and
    exits: the janitor is no child of the owner, in a session of its own, no fds inherited)."""
    subprocess.run(["/bin/sh", "-c", '"$0" "$1" "$2" </dev/null >/dev/null 2>&1 &', sys.executable,
                    str(Path(__file__).resolve()), str(record)], check=True, start_new_session=True)


def main(record: str) -> None:
    while not release(Path(record)):
        time.sleep(POLL_S)


if __name__ == "__main__":
    main(sys.argv[1])
