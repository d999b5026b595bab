"""Driver start-up and checkpoints at the real job's sizes (issue 24 items 5 and 6), before vs
after in one run. ``bench/rl_step.py --shape real --parts startup,checkpoint`` runs it.

* Start-up: ``--startup-prompts`` procedural prompts (the tiny Qwen2.5-VL's processor), the
  driver's prompt loading (``avar_ray.rl.prompts.load_prompts``) timed in this process:
  before = every start as it was (the processor over every prompt, serially, no cache:
  ``rl.prompt_workers=1 rl.prompt_cache=false``); cold = the first start now (a process pool
  of one process per core, the verdicts written to the cache); resume = a second start with
  the same data and settings (the cache read: the prompts read, no processor).
* Checkpoints: 2 learner ranks (DeepSpeed ZeRO-3 over gloo, AdamW, Ray actors:
  ``LearnerGroup``) on the 2-layer model at ``--hidden`` (vocabulary 151,936, head tied) after
  one update, saved through ``avar_ray.rl.checkpoint.Saver``: before = the old step (the
  DeepSpeed state and the HF export written while the step waits); after = a checkpoint of a
  step that is not the last (``rl.save_hf_every`` 0: the DeepSpeed state only) submitted, the
  next step's generation (the driver waiting ``--gen-seconds``; 0: as long as the old save
  took), then the wait for the save's end before the next learner call. Critical path = the
  seconds the driver spends in the checkpoint phase (submission + that wait). The last step's
  checkpoint still has nothing to overlap and costs what it did.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_local.yaml")


def startup_seconds(work: Path, count: int) -> dict:
    """Seconds of the driver's prompt loading for ``count`` prompts: before, cold, resume."""
    from avar_ray.config import load_config
    from avar_ray.data.procedural import write_procedural
    from avar_ray.rl.prompts import load_prompts
    from avar_ray.tiny_model import build_tiny_model

    model = build_tiny_model(work / "tiny_start", seed=0)
    data = write_procedural(work / "start_data", n=count, seed=0)
    base = [f"model.path={model}", f"data.train={data}", f"rl.out={work / 'start_rl'}"]
    cache = work / "start_rl" / "prompt_cache"
    out = {}
    for label, extra in (("before", ["rl.prompt_workers=1", "rl.prompt_cache=false"]), ("cold", []),
                         ("resume", [])):
        start = time.perf_counter()
        prompts = load_prompts(load_config(CONFIG, base + extra), cache)
        out[f"{label}_s"] = time.perf_counter() - start
        out[f"{label}_checked"] = prompts.checked
        print(f"  start-up {label}: {out[f'{label}_s']:.1f}s ({prompts.summary()})", flush=True)
    out["prompts"] = count
    return out


def checkpoint_seconds(work: Path, hidden: int, rounds: int, gen_seconds: float) -> dict:
    """Seconds on the step's critical path per checkpoint, before vs after (module docstring)."""
    import ray

    from actors.learner_group import LearnerGroup
    from avar_ray.config import load_config
    from avar_ray.rl import checkpoint
    from avar_ray.tiny_model import build_tiny_model
    from bench.rl_common import init_ray
    from bench.rl_step_real import make_items, real_width_model

    model = real_width_model(build_tiny_model(work / "tiny_ckpt", seed=0), work / "real_ckpt", hidden)
    cfg = load_config(CONFIG, [f"model.path={model}", "rl.zero_stage=3", "rl.placement.learners=2",
                               "rl.micro_batch_size=2", "rl.n_samples=2"])
    init_ray()
    learners = LearnerGroup(cfg.rl, cfg.model, cfg.attention)
    try:
        learners.train_step(make_items(model, 2, 2, 0.1))  # the optimizer's state exists, as in a run
        submit = checkpoint.learner_submit(learners)
        out: dict = {"before_s": [], "after_s": [], "after_wait_s": [], "gen_s": [], "state_only_s": []}
        for r in range(rounds):
            ckpt = work / f"ckpt_{r}"
            start = time.perf_counter()  # before: the step waits for the state and the export
            checkpoint.Saver(ckpt, keep=0, background=False).start(submit, 1, {"step": 1}, hf=True)
            out["before_s"].append(time.perf_counter() - start)
            start = time.perf_counter()  # the DeepSpeed state alone, waited (no generation to overlap)
            checkpoint.Saver(ckpt, keep=0, background=False).start(submit, 3, {"step": 3}, hf=False)
            out["state_only_s"].append(time.perf_counter() - start)
            gen = gen_seconds or out["before_s"][-1]
            saver = checkpoint.Saver(ckpt, keep=0)
            start = time.perf_counter()  # after: submitted; the next step generates; then its first learner call
            saver.start(submit, 2, {"step": 2}, hf=checkpoint.hf_due(2, cfg.rl))
            submitted = time.perf_counter() - start
            time.sleep(gen)
            waited = saver.finish()
            out["after_s"].append(submitted + waited)
            out["after_wait_s"].append(waited)
            out["gen_s"].append(gen)
            out["size_mb"] = sum(f.stat().st_size for f in (ckpt / "step_1").rglob("*") if f.is_file()) / 2**20
            shutil.rmtree(ckpt)
            print(f"  checkpoint round {r}: before {out['before_s'][-1]:.2f}s; state alone, waited "
                  f"{out['state_only_s'][-1]:.2f}s; after {out['after_s'][-1]:.2f}s "
                  f"(submit {submitted:.3f}s + wait {waited:.2f}s past {gen:.1f}s of generation)", flush=True)
        return out
    finally:
        learners.shutdown()
        ray.shutdown()


def report(args, startup: dict | None, ckpt: dict | None) -> None:
    if startup:
        s = startup
        print(f"\n== driver start-up, {s['prompts']} prompts (prompt loading: read + checks)")
        print("| | before (serial, no cache) | cold (pool) | resume (cache hit) | resume / cold | resume / before |")
        print("|---|---|---|---|---|---|")
        print(f"| seconds | {s['before_s']:.1f} | {s['cold_s']:.1f} | {s['resume_s']:.1f} | "
              f"{s['resume_s'] / s['cold_s']:.3f} | {s['resume_s'] / s['before_s']:.3f} |")
        print(f"| prompts through the processor | {s['before_checked']} | {s['cold_checked']} | "
              f"{s['resume_checked']} | | |")
    if ckpt:
        c = ckpt
        best = {k: min(c[k]) for k in ("before_s", "after_s", "state_only_s")}
        print(f"\n== checkpoint seconds on the step's critical path (2 ranks ZeRO-3 gloo, hidden {args.hidden}, "
              f"{c['size_mb']:.0f} MB per checkpoint with its HF export)")
        print("| | before (state + HF export, waited) | after (submitted, overlapped) | after / before |")
        print("|---|---|---|---|")
        print(f"| min of {len(c['before_s'])} rounds | {best['before_s']:.2f} | {best['after_s']:.2f} | "
              f"{best['after_s'] / best['before_s']:.3f} |")
        print(f"| the DeepSpeed state alone, waited (no generation to overlap; the last step adds its HF export) | "
              f"{best['before_s']:.2f} | {best['state_only_s']:.2f} | {best['state_only_s'] / best['before_s']:.3f} |")
        rounds = {k: ", ".join(f"{v:.2f}" for v in c[k]) for k in ("before_s", "after_s", "after_wait_s", "gen_s")}
        print(f"| all rounds | {rounds['before_s']} | {rounds['after_s']} (wait {rounds['after_wait_s']}; "
              f"generation {rounds['gen_s']} s) | |")


def run(args, work: Path, parts: set[str]) -> None:
    startup = startup_seconds(work, args.startup_prompts) if "startup" in parts else None
    ckpt = checkpoint_seconds(work, args.hidden, args.rounds, args.gen_seconds) if "checkpoint" in parts else None
    report(args, startup, ckpt)
