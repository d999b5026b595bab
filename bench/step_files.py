"""Which project files one GRPO step runs code from (issue 14: "one GRPO step passes through at
most 12 of the project's files"; the list is in docs/architecture.md).

    .venv/bin/python bench/step_files.py [--steps 4] [--save-every 2]

Runs ``run_rl`` on the tiny Qwen2.5-VL and procedural prompts with every Python process of the
run traced: the driver, the Ray workers (rollout worker, reward actor, learners) and vLLM's
engine core. A ``sitecustomize`` module put first on ``PYTHONPATH`` (processes inherit it)
installs a ``sys.settrace`` hook that records, per file under ``avar_ray/``, ``actors/`` and
``rewards/``, the tenths of a second in which one of its functions (or its module body) ran,
and writes them every second. A file counts for a step when a call falls between the step's
first phase and the next step's. Step 1 also runs the lazy imports; with ``--save-every 2``
step 2 saves a checkpoint and step 3 is a plain step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("avar_ray", "actors", "rewards")

TRACER = '''
import json, os, sys, threading, time

_OUT = os.environ["AVAR_STEP_FILES_OUT"]
_prefixes = tuple(os.path.join(os.environ["AVAR_STEP_FILES_ROOT"], p) + os.sep for p in %r)
_seen, _other = {}, set()


def _trace(frame, event, arg):
    code = frame.f_code
    if code not in _other:
        if code.co_filename.startswith(_prefixes):
            _seen.setdefault(code.co_filename, set()).add(int(time.time() * 10))
        else:
            _other.add(code)  # the check above once per foreign function
    return None  # no line events


def _dump():
    path = os.path.join(_OUT, f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump({k: sorted(v) for k, v in list(_seen.items())}, fh)
    os.replace(path + ".tmp", path)


def _loop():
    while True:
        time.sleep(1)
        try:
            _dump()
        except Exception:
            pass


os.makedirs(_OUT, exist_ok=True)
sys.settrace(_trace)
threading.settrace(_trace)
threading.Thread(target=_loop, daemon=True).start()
''' % (PACKAGES,)


def run(args) -> None:
    """The traced run (inside the child process)."""
    sys.path.insert(0, str(REPO))
    from avar_ray.config import load_config
    from avar_ray.data.procedural import write_procedural
    from avar_ray.rl import run_rl
    from avar_ray.tiny_model import build_tiny_model

    work = Path(args.work)
    model = build_tiny_model(work / "tiny", seed=0)
    data = write_procedural(work / "data", n=16, seed=0)
    cfg = load_config(None, [f"model.path={model}", f"data.train={data}", f"rl.out={work / 'rl'}",
                             f"rl.steps={args.steps}", "rl.prompts_per_step=2", "rl.n_samples=2",
                             "rl.max_new_tokens=8", f"rl.save_every={args.save_every}", "rl.keep_checkpoints=0",
                             "rl.reward.visual_gate=false", "ray.num_cpus=4"])
    marks = []

    def hook(step: int, phase: str) -> None:
        marks.append((time.time(), step, phase))
        if step == args.steps and phase == "sample" and not any(s == step for _, s, _ in marks[:-1]):
            time.sleep(3)  # every process writes the earlier steps' calls before the last step and shutdown

    run_rl(cfg, on_phase=hook)
    (work / "marks.json").write_text(json.dumps(marks))


def report(work: Path, out: Path) -> None:
    marks = json.loads((work / "marks.json").read_text())
    starts: dict[int, float] = {}
    for t, step, _ in marks:
        starts.setdefault(step, t)
    procs = [json.loads(p.read_text()) for p in out.glob("*.json")]
    root = str(REPO) + os.sep
    for step in sorted(s for s in starts if s + 1 in starts):
        lo, hi = starts[step] * 10, starts[step + 1] * 10
        files = sorted({fn.replace(root, "") for proc in procs for fn, ticks in proc.items()
                        if any(lo <= t < hi for t in ticks)})
        print(f"step {step}: {len(files)} project files")
        for fn in files:
            print(f"  {fn}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--work", help=argparse.SUPPRESS)  # set for the traced child
    args = parser.parse_args()
    if args.work:
        run(args)
        return
    with tempfile.TemporaryDirectory(prefix="avar_step_files_") as tmp:
        tmp = Path(tmp)
        (tmp / "hook").mkdir()
        (tmp / "hook" / "sitecustomize.py").write_text(TRACER)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "hook"), str(REPO), os.environ.get("PYTHONPATH", "")]),
               "AVAR_STEP_FILES_ROOT": str(REPO), "AVAR_STEP_FILES_OUT": str(tmp / "calls"),
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "TOKENIZERS_PARALLELISM": "false", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
        cmd = [sys.executable, __file__, "--work", str(tmp / "work"), "--steps", str(args.steps),
               "--save-every", str(args.save_every)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        time.sleep(2)  # the last writes of processes still shutting down
        report(tmp / "work", tmp / "calls")


if __name__ == "__main__":
    main()
