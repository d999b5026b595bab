"""The suite is its own cluster: with a Ray head running (`ray start --head`) and RAY_ADDRESS
pointing at it, the suite's Ray (conftest.start_test_ray) and a stage's Ray with no address
(avar_ray.ray_utils.init_ray, what the `avar` subprocesses of the tests run) are new local ones,
not that head, neither through RAY_ADDRESS nor through the address file `ray start` writes. A bare
``ray.init()`` with RAY_ADDRESS set joins the head (the control: the hijack is real).

The head is this test's own (its own RAY_TMPDIR, ports and a custom resource to recognise it)
and is stopped by signalling its own `ray start --block` process, never `ray stop`.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_cluster import processes_using  # noqa: E402 - tests/ is on sys.path under pytest

from avar_ray.ray_utils import free_port

TESTS = Path(__file__).resolve().parent
MARKER = "avar_isolation_head"

PROBE = f"""
import json, os, sys
address = os.environ["RAY_ADDRESS"]
sys.path.insert(0, {str(TESTS)!r})
import ray
from conftest import start_test_ray  # drops RAY_ADDRESS (the suite's subprocesses must not inherit it)
from avar_ray.ray_utils import init_ray
os.environ["RAY_ADDRESS"] = address  # a shell that sets it: the hijack under test

def joined():
    found = ray.cluster_resources().get({MARKER!r}) is not None
    ray.shutdown()
    return found

seen = {{}}
ray.init(); seen["bare, RAY_ADDRESS"] = joined()
start_test_ray(); seen["suite, RAY_ADDRESS"] = joined()
del os.environ["RAY_ADDRESS"]
start_test_ray(); seen["suite, address file"] = joined()
init_ray(); seen["stage, address file"] = joined()
print("AVAR_JOINED", json.dumps(seen))
"""


@pytest.mark.slow
def test_the_suites_ray_never_joins_a_running_head():
    bin_dir = Path(sys.executable).parent
    root = tempfile.mkdtemp(prefix="avar-iso-", dir="/tmp")  # short: socket paths are limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_TMPDIR=root, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # its address file: root/ray/
    # a token of its own (not ~/.ray/auth_token, which other Rays on the machine may rewrite)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    port = free_port()
    ports = {"--port": port, "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--metrics-export-port": free_port()}
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--include-dashboard", "false", "--num-cpus", "1", "--object-store-memory", str(80 * 1024 * 1024),
           "--disable-usage-stats", "--resources", json.dumps({MARKER: 1}),
           *[str(x) for kv in ports.items() for x in kv]]
    log_path = Path(root) / "head.log"
    head = subprocess.Popen(cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(Path(root).glob("ray/ray_current_cluster")):
            assert head.poll() is None, f"ray start exited ({head.returncode}):\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"Ray head not up after 120 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        probe = subprocess.run([sys.executable, "-c", PROBE], env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                               capture_output=True, text=True, timeout=400)
        assert probe.returncode == 0, (probe.stdout + probe.stderr)[-4000:]
        (line,) = [l for l in probe.stdout.splitlines() if l.startswith("AVAR_JOINED ")]
        joined = json.loads(line.split(" ", 1)[1])
        # (a bare ray.init() through the address file is no control here: with the suite's own Ray
        # running it finds several instances and may pick either)
        assert joined == {"bare, RAY_ADDRESS": True, "suite, RAY_ADDRESS": False, "suite, address file": False,
                          "stage, address file": False}, joined
    finally:  # the head's own process, then anything it or the probe left behind under root
        head.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=60)
        if head.poll() is None:
            head.kill()
        head.wait()
        for pid in processes_using(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
