"""The engine janitor's record of an engine's IPC socket directory (``avar_ray.engines``
gives each vLLM engine its own ``VLLM_RPC_BASE_PATH``; vLLM leaves 7 socket files per engine
behind, even after a clean shutdown): removed with its queues once the engine's processes are
gone, kept while one runs. The real engines are checked by the ``engines_stopped`` fixture."""
import os
import socket
import subprocess
import sys


def test_release_removes_a_dead_engines_socket_directory_and_keeps_a_live_ones(tmp_path):
    from avar_ray import engine_janitor

    def engine_dir(name: str):
        path = tmp_path / name
        path.mkdir()
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path / "0d6c2f4e-ipc"))  # a bound socket leaves its file, as vLLM's do
        sock.close()
        queue = tmp_path / f"psm_{name}"
        queue.write_bytes(b"\0")
        return path, queue

    dead_dir, dead_queue = engine_dir("dead")
    live_dir, live_queue = engine_dir("live")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    records = [engine_janitor.write_record(os.getpid(), [gone.pid], [str(dead_queue)], (str(dead_dir),)),
               engine_janitor.write_record(os.getpid() + 10**6, [os.getpid()], [str(live_queue)], (str(live_dir),))]
    try:
        assert engine_janitor.release(records[0]) and not records[0].exists()
        assert not dead_dir.exists() and not dead_queue.exists()
        assert not engine_janitor.release(records[1])  # this process "runs the engine"
        assert live_dir.exists() and live_queue.exists() and records[1].exists()
    finally:
        for record in records:
            record.unlink(missing_ok=True)
