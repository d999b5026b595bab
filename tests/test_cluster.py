"""Cluster use (issue 7, item 4).

- The KubeRay manifests in configs/kuberay/ validate against KubeRay's own CRD schemas (strictly:
  an unknown field fails, as with `kubectl apply --validate=strict`), carry what KubeRay needs
  (entrypoint, cluster spec, GPU limits, image, runtime env, token auth), and their
  entrypoints name real `avar` subcommands with config files of this repository that load.
- configs/qwen2_5_vl_7b.yaml loads and holds the paper's settings (SPEC.md).
- A real `ray job submit --working-dir REPO` to a local Ray head (`ray start --head` on
  127.0.0.1) with token authentication on runs an `avar` command and succeeds, and a stage's
  driver under `ray job submit` joins that cluster.
"""
from __future__ import annotations

import copy
import functools
import gzip
import importlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from argparse import ArgumentParser
from pathlib import Path

import pytest
import yaml

from avar_ray.cli import COMMANDS
from avar_ray.config import load_config
from avar_ray.ray_utils import WORKER_ENV, free_port

REPO = Path(__file__).resolve().parents[1]
KUBERAY_DIR = REPO / "configs" / "kuberay"
SCHEMA_DIR = REPO / "tests" / "data" / "kuberay_crds"  # KubeRay's CRDs (gzipped, Apache-2.0)
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml.gz", "RayCluster": "ray.io_rayclusters.yaml.gz"}
PAPER_CONFIG = REPO / "configs" / "qwen2_5_vl_7b.yaml"
GPU = "nvidia.com/gpu"
HEAD_MARKER = "avar_test_head"  # a custom resource only the test's Ray head has


# ----------------------------------------------------------------------------- helpers
def load_manifests() -> dict[str, dict]:
    """File name -> manifest, for every YAML file under configs/kuberay/."""
    found = {}
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, f"{path.name}: expected one manifest, found {len(docs)}"
        found[path.name] = docs[0]
    return found


def of_kind(kind: str) -> dict[str, dict]:
    return {name: doc for name, doc in load_manifests().items() if doc.get("kind") == kind}


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(spec: dict) -> list[tuple[str, dict]]:
    """(group name, container) for the head and every worker group of a cluster spec."""
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec["workerGroupSpecs"]:
        out += [(group["groupName"], c) for c in group["template"]["spec"]["containers"]]
    return out


def cluster_gpus(spec: dict) -> int:
    return sum(int(group["replicas"]) * int(c["resources"]["limits"].get(GPU, 0))
               for group in spec["workerGroupSpecs"] for c in group["template"]["spec"]["containers"])


def strict_schema(node):
    """KubeRay's openAPIV3Schema as JSON Schema that rejects unknown fields (the API server
    would prune them silently: a misspelt key would vanish) and honours ``nullable``."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_validator(kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-1.4 MB of YAML
    crd = yaml.load(gzip.decompress((SCHEMA_DIR / CRD_FILES[kind]).read_bytes()), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def schema_errors(doc: dict) -> list[str]:
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in errors)


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """Split a shell entrypoint into its commands; only ``&&`` chains are allowed."""
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token == "&&":
            commands.append(current)
            current = []
        else:
            assert not set(token) <= set(";|&()<>"), f"unsupported shell syntax {token!r} in {entrypoint!r}"
            current.append(token)
    commands.append(current)
    assert all(commands), f"empty command in {entrypoint!r}"
    return commands


def check_avar_command(argv: list[str]) -> str:
    """An entrypoint command runs a real `avar` subcommand whose arguments its parser accepts and
    whose config (with the command's overrides) loads; returns the subcommand."""
    if argv[:3] == ["python", "-m", "avar_ray"]:
        rest = argv[3:]
    else:
        assert argv[0] == "avar", f"not an avar command: {shlex.join(argv)}"
        rest = argv[1:]
    assert rest and rest[0] in COMMANDS, f"unknown avar subcommand in {shlex.join(argv)} (known: {sorted(COMMANDS)})"
    name, args = rest[0], rest[1:]
    module_name = COMMANDS[name][0]
    if importlib.util.find_spec(module_name) is not None:  # stages land one by one
        parser = ArgumentParser(prog=f"avar {name}")
        importlib.import_module(module_name).add_arguments(parser)
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"`avar {name}` rejects the arguments of {shlex.join(argv)}")
    for flag in ("-c", "--config"):
        if flag in args:
            i = args.index(flag)
            config = REPO / args[i + 1]
            assert config.is_file(), f"{shlex.join(argv)}: config {args[i + 1]} is not a file of the repository"
            overrides = [a for a in args[i + 2:] if "=" in a and not a.startswith("-")]
            load_config(config, overrides)
    return name


# ----------------------------------------------------------------------------- manifests
def test_manifests_cover_the_rl_stage_the_pipeline_and_a_cluster():
    manifests = load_manifests()
    assert manifests, f"no manifests in {KUBERAY_DIR}"
    for name, doc in manifests.items():
        assert doc.get("apiVersion") == "ray.io/v1", f"{name}: apiVersion must be ray.io/v1"
        assert doc.get("kind") in CRD_FILES, f"{name}: kind {doc.get('kind')!r} is not RayJob/RayCluster"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), f"{name}: bad metadata.name"
    assert of_kind("RayCluster"), "no RayCluster manifest"
    stages = {name: [check_avar_command(c) for c in entrypoint_commands(doc["spec"]["entrypoint"])]
              for name, doc in of_kind("RayJob").items()}
    assert ["rl"] in stages.values(), f"no RayJob runs the RL stage alone: {stages}"
    pipelines = [s for s in stages.values() if {"synth", "sft", "rl", "eval", "analyze"} <= set(s)]
    assert pipelines, f"no RayJob runs the whole pipeline: {stages}"
    order = pipelines[0]
    assert order.index("synth") < order.index("sft") < order.index("rl") < order.index("eval") < order.index("analyze")


def _option(argv: list[str], flag: str):
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_pipeline_reads_what_the_stages_write():
    """Each step of the pipeline RayJob starts from the previous step's output path as the stages
    name it (SFT: sft.out/final; RL: its HF export of the last step), and analyze reads the three
    evals in stage order."""
    checkpoint = pytest.importorskip("avar_ray.rl.checkpoint")
    (job,) = [doc for doc in of_kind("RayJob").values() if "analyze" in doc["spec"]["entrypoint"]]
    steps = {}
    for argv in entrypoint_commands(job["spec"]["entrypoint"]):
        steps.setdefault(argv[1], []).append(argv[2:])
    cfg = load_config(REPO / _option(steps["sft"][0], "-c"))
    sft_model = str(Path(cfg.sft.out) / "final")
    rl_model = str(checkpoint.hf_dir(Path(cfg.rl.out) / "checkpoints", cfg.rl.steps))
    assert f"model.path={sft_model}" in steps["rl"][0], "RL must start from the cold-start export"
    evals = steps["eval"]
    assert [_option(e, "--model") for e in evals] == [None, sft_model, rl_model]  # None: model.path (base)
    assert steps["analyze"][0][:3] == [_option(e, "--out") for e in evals]


@pytest.mark.parametrize("name", sorted(load_manifests()))
def test_manifest_validates_against_kuberay_crd(name):
    doc = load_manifests()[name]
    errors = schema_errors(doc)
    assert not errors, f"{name} does not validate against KubeRay's {doc['kind']} CRD:\n" + "\n".join(errors)


def test_crd_validation_catches_mistakes():
    """The strict validation bites: a misspelt field and a malformed GPU count both fail."""
    doc = next(iter(of_kind("RayJob").values()))
    typo = copy.deepcopy(doc)
    typo["spec"]["rayClusterSpec"]["workerGroupSpec"] = typo["spec"]["rayClusterSpec"].pop("workerGroupSpecs")
    assert any("workerGroupSpec" in e for e in schema_errors(typo))
    bad_gpu = copy.deepcopy(doc)
    bad_gpu["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"][GPU] = "eight"
    assert any(GPU in e for e in schema_errors(bad_gpu))


@pytest.mark.parametrize("name", sorted(load_manifests()))
def test_manifest_carries_what_kuberay_needs(name):
    doc = load_manifests()[name]
    spec = cluster_spec(doc)
    assert spec["headGroupSpec"]["template"]["spec"]["containers"], f"{name}: head has no container"
    assert spec["workerGroupSpecs"], f"{name}: no worker group"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: token authentication must be on"
    images = {c.get("image") for _, c in containers(spec)}
    assert len(images) == 1 and None not in images and "" not in images, f"{name}: one image everywhere, got {images}"
    for group in spec["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            assert int(c["resources"]["limits"].get(GPU, 0)) > 0, f"{name}: {group['groupName']} has no {GPU} limit"
    assert cluster_gpus(spec) > 0
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].strip(), f"{name}: empty entrypoint"
        runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert isinstance(runtime_env, dict), f"{name}: runtimeEnvYAML is not a mapping"
        working_dir = runtime_env.get("working_dir", "")
        assert working_dir.startswith("/"), f"{name}: runtimeEnvYAML needs the image's repository as working_dir"
        assert f"WORKDIR {working_dir}" in (KUBERAY_DIR / "Dockerfile").read_text(), \
            f"{name}: working_dir {working_dir} is not where configs/kuberay/Dockerfile puts the repository"
        assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values()), \
            f"{name}: runtime env variables must be strings"
        assert not any("KEY" in k or "TOKEN" in k for k in runtime_env.get("env_vars", {})), \
            f"{name}: secrets do not belong in the runtime env (the dashboard shows it)"


def test_rayjob_clusters_are_the_raycluster_spec():
    """The RayJobs repeat raycluster.yaml's spec (a RayJob must be self-contained); keep the
    copies from drifting apart."""
    (cluster,) = of_kind("RayCluster").values()
    for name, job in of_kind("RayJob").items():
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], f"{name}: rayClusterSpec differs from raycluster.yaml"


def test_paper_placement_fits_the_cluster():
    from actors.placement import check_resources, total_demand

    cfg = load_config(PAPER_CONFIG)
    (cluster,) = of_kind("RayCluster").values()
    gpus = cluster_gpus(cluster["spec"])
    rl_gpus = total_demand(cfg.rl.placement, cfg.rl.rollout_tensor_parallel_size).gpus
    assert 0 < rl_gpus <= gpus, f"RL placement asks for {rl_gpus} GPUs, the cluster has {gpus}"
    check_resources(cfg.rl.placement, {"CPU": 1e6, "GPU": gpus}, cfg.rl.rollout_tensor_parallel_size)
    assert cfg.sft.num_workers <= gpus


def test_rollout_tensor_parallel_size_is_validated_and_counted():
    """``rl.rollout_tensor_parallel_size``: one engine over tp GPUs. Only the CPU side exists
    here: the config validates, the resource check and the actor options count tp GPUs per
    rollout worker, and the engines' ranks in the weight-broadcast group are offset by tp."""
    from actors.placement import PlacementError, broadcast_ranks, check_resources, rollout_options, total_demand

    cfg = load_config(PAPER_CONFIG, ["rl.rollout_tensor_parallel_size=2", "rl.placement.rollout_workers=3"])
    p = cfg.rl.placement
    base = total_demand(p).gpus
    assert total_demand(p, 2).gpus == base + 3 * p.rollout_gpus
    assert rollout_options(p, 2)["num_gpus"] == 2 * p.rollout_gpus
    check_resources(p, {"CPU": 1e6, "GPU": base + 3 * p.rollout_gpus}, 2)
    with pytest.raises(PlacementError, match=r"rl.rollout_tensor_parallel_size \(2\)"):
        check_resources(p, {"CPU": 1e6, "GPU": base + 3 * p.rollout_gpus - 1}, 2)
    assert broadcast_ranks(3, 2) == ([1, 3, 5], 7) and broadcast_ranks(2) == ([1, 2], 3)
    with pytest.raises(ValueError, match="rl.rollout_tensor_parallel_size: must be >= 1"):
        load_config(PAPER_CONFIG, ["rl.rollout_tensor_parallel_size=0"])
    with pytest.raises(ValueError, match="needs GPUs"):
        load_config(None, ["rl.rollout_tensor_parallel_size=2"])  # the default placement has no GPUs


def test_weight_sync_defaults_to_the_broadcast_group_and_refuses_the_old_nccl_value():
    """broadcast is gloo without GPUs (the default placement, the tests), nccl with whole GPUs on
    both sides; a config that still says nccl fails naming the field and the new value."""
    from avar_ray.rl.system import transport

    cfg = load_config(None)
    assert cfg.rl.weight_sync_backend == "broadcast" and transport(cfg.rl) == "gloo"
    half = load_config(None, ["rl.placement.learner_gpus=1"])  # learners on GPUs, rollouts on CPU
    assert transport(half.rl) == "gloo"
    shared = load_config(None, ["rl.placement.learner_gpus=0.5", "rl.placement.rollout_gpus=0.4"])
    assert transport(shared.rl) == "gloo"  # maybe one GPU for both: NCCL refuses two ranks on one
    whole = load_config(None, ["rl.placement.learner_gpus=1", "rl.placement.rollout_gpus=1"])
    assert transport(whole.rl) == "nccl"
    assert transport(load_config(None, ["rl.weight_sync_backend=object_store"]).rl) == "object_store"
    with pytest.raises(ValueError, match=r"rl\.weight_sync_backend: expected one of 'broadcast', 'object_store', "
                                         r"got 'nccl'"):
        load_config(None, ["rl.weight_sync_backend=nccl"])
    with pytest.raises(ValueError, match=r"rl\.weight_sync_timeout_s: must be positive"):
        load_config(None, ["rl.weight_sync_timeout_s=0"])


# ----------------------------------------------------------------------------- paper config
def test_paper_config_loads_with_the_papers_settings():
    from avar_ray.rl.system import transport

    cfg = load_config(PAPER_CONFIG)
    assert cfg.model.dtype == "bfloat16"
    # AGTO cold start (SPEC.md §4)
    assert (cfg.sft.alpha, cfg.sft.beta, cfg.sft.lr) == (0.15, 0.15, 5e-6)
    assert cfg.sft.num_workers * cfg.sft.micro_batch_size * cfg.sft.grad_accum == 512
    assert cfg.sft.zero_stage == 3 and not cfg.sft.freeze_vision  # bf16: model.dtype
    assert cfg.sft.agto_query == "response" and cfg.attention.layers is None
    # GRPO with VARS (SPEC.md §5)
    assert (cfg.rl.lr, cfg.rl.prompts_per_step, cfg.rl.n_samples, cfg.rl.kl_coef) == (1e-6, 256, 8, 0.0)
    assert (cfg.rl.reward.lambda_v, cfg.rl.reward.lambda_f, cfg.rl.reward.visual_norm) == (0.3, 0.1, "none")
    assert cfg.rl.weight_sync_backend == "broadcast"
    assert transport(cfg.rl) == "nccl"  # both sides have GPUs
    # training-free intervention (SPEC.md §2) and eps
    assert (cfg.intervention.a_img, cfg.intervention.a_sys) == (0.15, 0.4)
    assert cfg.attention.eps == 1e-6 and cfg.attention.layers is None  # VAS, AGTO and r_visual
    assert len(cfg.data.eval) == 7  # the seven benchmarks of SPEC.md §6
    for teacher in (cfg.synth.caption, cfg.synth.reasoning, cfg.synth.anchor):
        assert (REPO / teacher.prompt).is_file(), f"prompt file {teacher.prompt} missing"


# ----------------------------------------------------------------------------- ray job submit
def processes_using(path: str) -> list[int]:
    """Pids whose command line mentions ``path`` (our head's temp dir): what teardown must end."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if path in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A local multi-process Ray head on 127.0.0.1 (own ports and temp dir, so it cannot meet
    the embedded `ray_local` of other tests) with token authentication on. `ray start` turns
    it on only with RAY_AUTH_MODE=token or when a token already exists (else it warns and
    runs open), so the test asks for it explicitly, with its own token in the environment
    (nothing written to ~/.ray). Stopped by signalling its own `ray start --block` process:
    `ray stop` would end every Ray of the user on the machine, the session's embedded one
    and other people's included."""
    import requests

    bin_dir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="avar-head-", dir="/tmp")  # short: socket paths are limited
    token = secrets.token_hex(16)
    # No RAY_ADDRESS (the head must not join another Ray) and none of the variables init_ray
    # hands to workers (the probe test checks that they reach tasks through init_ray alone).
    dropped = {"RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", *WORKER_ENV}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # nothing to drain at teardown: stop at once
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--temp-dir", temp_dir,
           "--num-cpus", "1", "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
           "--resources", json.dumps({HEAD_MARKER: 1})]
    cmd += [str(x) for kv in ports.items() for x in kv]
    log_path = Path(temp_dir) / "head.log"
    head = subprocess.Popen(cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, f"ray start exited ({head.returncode}):\n{log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, f"Ray head not up after 120 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)
        # clients (ray job submit) run with the same RAY_AUTH_MODE=token and token
        yield {"address": address, "token": token, "env": env, "temp_dir": temp_dir}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        for pid in processes_using(temp_dir):  # anything the head left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(head: dict, entrypoint: list[str], job_id: str) -> str:
    """`ray job submit --working-dir REPO -- ENTRYPOINT` as a user types it; returns its output."""
    submit = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head["address"],
         "--submission-id", job_id, "--working-dir", str(REPO), "--", *entrypoint],
        env=head["env"], cwd=REPO, capture_output=True, text=True, timeout=400)
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, f"ray job submit failed ({submit.returncode}):\n{logs[-4000:]}"
    return logs


# What every stage does first (init_ray), run as a job's driver, plus one task on the cluster.
STAGE_DRIVER_PROBE = f"""
import json, os
from avar_ray.ray_utils import init_ray
ray = init_ray()
@ray.remote(num_cpus=1)
def probe():
    import avar_ray
    return {{"kv_cache": os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "package": avar_ray.__file__}}
print("AVAR_PROBE", json.dumps({{"marker": ray.cluster_resources().get("{HEAD_MARKER}"), **ray.get(probe.remote())}}))
"""


@pytest.mark.slow
def test_stage_driver_joins_the_cluster_under_ray_job_submit(ray_head):
    """A stage's driver under `ray job submit` connects to that cluster (RAY_ADDRESS), not to an
    embedded Ray; its tasks get the worker environment and the uploaded code."""
    logs = submit_job(ray_head, ["python", "-c", STAGE_DRIVER_PROBE], f"avar-probe-{secrets.token_hex(4)}")
    (line,) = [l for l in logs.splitlines() if l.startswith("AVAR_PROBE ")]
    result = json.loads(line.split(" ", 1)[1])
    assert result["marker"] == 1, f"the driver did not join the test's head: {result}"
    assert result["kv_cache"] == WORKER_ENV["VLLM_CPU_KVCACHE_SPACE"], f"init_ray's worker environment did not reach the task: {result}"
    uploads = Path(ray_head["temp_dir"]).resolve()
    assert Path(result["package"]).resolve().is_relative_to(uploads), f"task imported {result['package']}, not the upload"


@pytest.mark.slow
def test_ray_job_submit_runs_an_avar_command(ray_head, tiny_model_dir, tmp_path):
    import requests
    from safetensors.torch import load_file

    address, token = ray_head["address"], ray_head["token"]
    # token authentication is on: no token, no jobs
    assert requests.get(f"{address}/api/jobs/", timeout=10).status_code in (401, 403)

    out = tmp_path / "tiny_from_job"
    job_id = f"avar-test-{secrets.token_hex(4)}"
    logs = submit_job(ray_head, ["python", "-m", "avar_ray", "tiny-model", "--out", str(out)], job_id)
    assert f"tiny Qwen2.5-VL written to {out}" in logs, logs[-4000:]

    info = requests.get(f"{address}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert info["status"] == "SUCCEEDED", info

    # the artifact: the same checkpoint as the in-process build with the same seed
    mine, theirs = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert mine.keys() == theirs.keys()
    assert all((mine[k] == theirs[k]).all() for k in mine), "the job's tiny model differs from the in-process one"

    # what was uploaded: the code, without the virtual environment or git history, and small
    packages = [p for p in (Path(ray_head["temp_dir"]) / "session_latest" / "runtime_resources" / "working_dir_files")
                .glob("_ray_pkg_*") if p.is_dir()]
    assert packages, "no working_dir upload found on the head"
    package = packages[0]  # same files, same content hash: every job reuses one upload
    assert (package / "avar_ray" / "cli.py").is_file()
    assert not (package / ".venv").exists() and not (package / ".git").exists()
    size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    assert size < 20 * 1024 * 1024, f"working_dir upload is {size / 2**20:.1f} MiB"
