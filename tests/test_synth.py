"""Stage 1 (VARD synthesis): pure step logic, then the Ray Data pipeline with each teacher kind
(oracle on procedural data, a tiny-model vLLM engine, an OpenAI-compatible server on 127.0.0.1)."""
from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avar_ray.config import TeacherConfig, load_config
from avar_ray.data.procedural import generate_samples
from avar_ray.data.schema import PARQUET_SCHEMA, format_question, from_row, to_row
from avar_ray.synth.anchors import has_anchor, insert_anchors, split_sentences
from avar_ray.synth.openai_client import OpenAITeacher, Secret, backoff_delay
from avar_ray.synth.prompts import PromptError, load_prompt
from avar_ray.synth.shards import ShardStore, committed_shards
from avar_ray.synth import run_synthesis
from avar_ray.synth.steps import oracle_chain
from avar_ray.synth.teachers import ChatRequest, TeacherError, user_message
from avar_ray.synth.verify import NO_ANSWER, WRONG_ANSWER, build_target, final_answer, verify
from fake_openai import FakeOpenAI, user_text

REPO = Path(__file__).resolve().parents[1]
TARGET_RE = re.compile(r"^<think>\n(.+)\n</think>\n<answer>(.+)</answer>$", re.DOTALL)


def synth_config(input_path, out, *overrides):
    return load_config(REPO / "configs" / "tiny_local.yaml",
                       [f"synth.input={input_path}", f"synth.out={out}", *overrides])


def write_rows(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), path)
    return path


def kept_rows(out) -> dict[str, dict]:
    """id -> training row over every committed shard; fails on a duplicate id."""
    rows: dict[str, dict] = {}
    for part in committed_shards(out):
        for row in pq.read_table(part).to_pylist():
            assert row["id"] not in rows, f"duplicate id {row['id']} in {part}"
            rows[row["id"]] = row
    return rows


def manifests(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "shards").glob("part-*.json"))]


def quarantine_records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "quarantine.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- pure step logic
def test_anchors_keep_the_final_sentence_last_and_are_seeded_by_row():
    chain = "First fact. Second fact. Third fact. The answer is B."
    phrases = ["Let me look at the circle again.", "Checking the image: the square is red."]
    out = insert_anchors(chain, phrases, [0.33, 0.66], seed_key="row-1")
    sentences = split_sentences(out)
    assert sentences[-1] == "The answer is B."
    assert len(sentences) == 6 and sum(s in phrases for s in sentences) == 2
    assert out == insert_anchors(chain, phrases, [0.33, 0.66], seed_key="row-1")
    assert has_anchor(out) and not has_anchor(chain)
    assert insert_anchors(chain, [], [0.5], "x") == chain  # nothing to insert
    once = insert_anchors(chain, phrases[:1], [0.33, 0.66], seed_key="row-1")
    assert split_sentences(once).count(phrases[0]) == 1  # a phrase is never repeated


def test_short_chains_get_one_anchor_that_rereads_the_answer_fact():
    from avar_ray.data.procedural import TASKS, EASY_TASKS
    from avar_ray.synth.steps import rule_anchors

    for task in TASKS + EASY_TASKS:
        for sample in generate_samples(6, seed=2, chain="short", tasks=[task]):
            chain = oracle_chain(sample)
            anchored = rule_anchors(sample, "", chain, [0.33, 0.66])
            added = [s for s in split_sentences(anchored) if s not in split_sentences(chain)]
            assert len(added) == 1 and has_anchor(added[0]), anchored
            assert split_sentences(anchored)[-1] == f"The answer is {final_answer(chain)}."
            scene, target = sample.meta["scene"], sample.meta["target"]
            if task == "largest_colour":  # the large shape, in the answer's colour
                assert f"the {final_answer(chain)} " in added[0] and added[0].endswith("is the large one.")
            if task == "count_colour":  # the count the answer is, of the asked colour
                assert added[0].startswith(f"Checking the image: {len(target['objects'])} {target['colour']}")
            if scene["kind"] == "shapes" and task != "size":
                asked = {target.get("a"), target.get("b"), target.get("object"), *target.get("objects", [])}
                named = [o for o in scene["objects"] if f"{o['colour']} {o['shape']}" in added[0]]
                assert all(o["id"] in asked for o in named), added[0]  # no object the chain does not need


def test_verify_builds_targets_and_drops_wrong_or_missing_answers():
    sample = generate_samples(1, seed=0)[0]
    chain = oracle_chain(sample)
    verdict = verify(sample, chain)
    assert verdict.reason == "" and TARGET_RE.match(verdict.target).group(2) == sample.answer
    wrong = "A" if sample.answer != "A" else "B"
    assert verify(sample, chain.replace(f"The answer is {sample.answer}.", f"The answer is {wrong}.")).reason == WRONG_ANSWER
    assert verify(sample, "I looked and thought about it.").reason == NO_ANSWER
    # a teacher that already writes the tags keeps its answer
    assert build_target("<think>x</think><answer>C</answer>") == "<think>\nx\n</think>\n<answer>C</answer>"
    assert final_answer("so the answer is 42.") == "42"


def test_oracle_answers_from_the_scene_not_the_label():
    for sample in generate_samples(12, seed=0):
        if sample.answer_type != "choice":
            continue
        mislabelled = dataclasses.replace(sample, answer="A" if sample.answer != "A" else "B")
        assert final_answer(oracle_chain(sample)) == sample.answer
        assert final_answer(oracle_chain(mislabelled)) == sample.answer  # what the image shows
        assert verify(mislabelled, oracle_chain(mislabelled)).reason == WRONG_ANSWER


def test_prompt_files_carry_versions_and_reject_unknown_slots(tmp_path):
    prompt = load_prompt("configs/prompts/reasoning.txt", "reasoning", "synth.reasoning.prompt")
    assert prompt.provenance.startswith("reasoning-v1@")
    assert "Q?" in prompt.render(question="Q?", caption="c", answer_hint="")
    (tmp_path / "p.txt").write_text("no version line\n{question}\n")
    with pytest.raises(PromptError, match="version"):
        load_prompt(str(tmp_path / "p.txt"), "caption", "synth.caption.prompt")
    (tmp_path / "q.txt").write_text("# version: x\n{question} {answer}\n")
    with pytest.raises(PromptError, match=r"synth.caption.prompt: .*unknown slot\(s\) \['answer'\]"):
        load_prompt(str(tmp_path / "q.txt"), "caption", "synth.caption.prompt")


def test_teacher_requests_reference_image_markers_instead_of_sending_them(tiny_model_dir):
    """EasyR1/verl questions mark their images with `<image>`: in a teacher's request each marker
    becomes a reference ([image], [image k] with several) and the images go as parts, so the
    prompt the teacher's chat template renders holds one vision block per image and no literal
    `<image>` (an image token for LLaVA-style processors, noise for the rest)."""
    from avar_ray.modeling import load_processor
    from avar_ray.synth.steps import build_request

    one, two = generate_samples(2, seed=0)
    one = dataclasses.replace(one, question="<image>Find x.")
    two = dataclasses.replace(two, question="Compare <image> and <image>. Which is larger?", images=two.images * 2)
    processor = load_processor(str(tiny_model_dir))
    tcfg = TeacherConfig()
    for sample, refs in ((one, ["[image]"]), (two, ["[image 1]", "[image 2]"])):
        for step, row in (("caption", {}), ("reasoning", {"caption": "A figure."}), ("anchor", {"caption": "A figure.", "reasoning": "R."})):
            path = REPO / "configs" / "prompts" / f"{step}.txt"
            messages = build_request(step, sample, row, load_prompt(str(path), step, step), tcfg, 0).messages
            rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            asked = "{question}" in path.read_text()  # (the anchor step's prompt does not quote it)
            assert "<image>" not in rendered and all((ref in rendered) == asked for ref in refs), (step, rendered)
            images = len(sample.images) if step == "caption" else 0
            assert rendered.count("<|vision_start|><|image_pad|><|vision_end|>") == images, (step, rendered)


def test_shard_store_removes_uncommitted_files_and_resumes(tmp_path):
    store = ShardStore(tmp_path)
    store.recover()
    row = {**to_row(generate_samples(1, seed=0)[0]), "target": "t", "caption": "c", "anchor_mode": "rule",
           "teachers": "{}", "prompts": "{}"}
    store.commit([row], {"d1": "answer does not verify"}, [{"id": "q1", "reason": "bad image"}])
    (tmp_path / "shards" / "part-dead-00000.parquet").write_bytes(b"half a shard")  # killed before its manifest
    (tmp_path / "shards" / ".part-dead-00001.parquet.ab.tmp").write_bytes(b"")
    ledger = ShardStore(tmp_path).recover()
    assert ledger.orphans_removed == 1 and ledger.kept == 1
    assert ledger.done == {row["id"], "d1", "q1"}
    assert [p.name for p in (tmp_path / "shards").iterdir() if "dead" in p.name] == []


def test_backoff_and_secret_never_print_the_key():
    assert backoff_delay(3, retry_after="2") == 2.0
    assert 1.0 <= backoff_delay(3) <= 2.0  # exponential with jitter: base 0.5 * 2**2, half to full
    secret = Secret("sk-very-secret")
    assert "sk-very-secret" not in f"{secret} {secret!r} {[secret]}"


def test_openai_client_retries_5xx_fails_fast_on_4xx_and_times_out():
    key = f"sk-{uuid.uuid4().hex}"
    calls = {"n": 0}

    def failures(request, attempt):
        text = user_text(request)
        if "flaky" in text and attempt == 1:
            return 503
        if "broken" in text:
            return 500
        return None

    def responder(request):
        calls["n"] += 1
        if "slow" in user_text(request):
            time.sleep(1.0)
        return f"echo: {user_text(request)}"

    req = lambda text: ChatRequest(user_message(text), 8, 0.0, 1)  # noqa: E731
    with FakeOpenAI(responder, api_key=key, failures=failures) as server:
        endpoint = TeacherConfig(kind="openai", model="m", base_url=server.base_url)
        teacher = OpenAITeacher(dataclasses.replace(endpoint, concurrency=2, max_retries=1, timeout_s=0.5), Secret(key))
        ok, flaky, broken, slow = teacher.complete([req("fine"), req("flaky"), req("broken"), req("slow")])
        assert ok == "echo: fine" and flaky == "echo: flaky"
        assert isinstance(broken, TeacherError) and "HTTP 500" in broken.detail and "2 attempts" in broken.detail
        assert isinstance(slow, TeacherError) and "timeout" in broken.detail + slow.detail
        assert server.statuses.count(503) == 1 and server.statuses.count(500) == 2
        wrong_key = OpenAITeacher(dataclasses.replace(endpoint, concurrency=1, max_retries=3, timeout_s=5),
                                  Secret("sk-wrong"))
        (denied,) = wrong_key.complete([req("fine")])
        assert isinstance(denied, TeacherError) and "HTTP 401" in denied.detail
        assert server.statuses.count(401) == 1  # a 4xx is not retried
        assert server.max_in_flight <= 2
        teacher.close()
        wrong_key.close()
    assert key not in repr(teacher.__dict__) and key not in f"{ok}{flaky}{broken}{slow}"


# ---------------------------------------------------------------- Ray Data pipeline
@pytest.mark.slow
def test_oracle_pipeline_counts_bad_rows_and_a_killed_rerun_equals_one_run(tmp_path, procedural_parquet,
                                                                          oracle_synth_dir):
    samples = [from_row(r) for r in pq.read_table(procedural_parquet).to_pylist()]
    first = samples[0]
    wrong = dataclasses.replace(first, id="planted-wrong-label", answer="A" if first.answer != "A" else "B")
    no_scene = dataclasses.replace(first, id="planted-no-scene", meta={})
    corrupt = {**to_row(first), "id": "planted-corrupt-image", "images": [b"\x89PNG\r\n\x1a\n not an image"]}
    rows = [to_row(wrong), corrupt, to_row(no_scene)] + [to_row(s) for s in samples]
    data = write_rows(tmp_path / "planted.parquet", rows)
    out = tmp_path / "synth"

    # A partial run (as if killed), then its last shard loses its manifest (killed mid-commit).
    part = run_synthesis(synth_config(data, out, "synth.max_rows=13", "synth.rows_per_shard=4"), progress=False)
    assert part.processed == 13 and part.deferred == len(rows) - 1 - 13 and part.shards_written == 4
    last_manifest = sorted((out / "shards").glob("part-*.json"))[-1]
    m = json.loads(last_manifest.read_text())
    lost = len(m["kept"]) + len(m["dropped"]) + len(m["quarantined"])
    last_manifest.unlink()

    report = run_synthesis(synth_config(data, out, "synth.rows_per_shard=4"), progress=False)
    assert report.orphans_removed == 1
    assert report.already_done == 13 - lost and report.processed == len(rows) - 1 - report.already_done
    assert report.read_skipped == {"corrupt image": 1}
    assert report.total_kept == 32 and report.out == str(out)

    # exactly the rows of the uninterrupted reference run: no duplicates, no losses, same content
    got, reference = kept_rows(out), kept_rows(oracle_synth_dir)
    assert set(got) == {s.id for s in samples} == set(reference)
    for rid, row in got.items():
        assert row == reference[rid], rid
    for rid, row in got.items():
        sample = from_row(row)
        match = TARGET_RE.match(row["target"])
        assert match and match.group(2) == sample.answer, row["target"]
        assert has_anchor(match.group(1)) and row["anchor_mode"] == "rule"
        assert row["caption"] == sample.meta["caption"]
        assert json.loads(row["teachers"]) == {"caption": "oracle", "reasoning": "oracle", "anchor": "oracle"}

    dropped = {k: v for m in manifests(out) for k, v in m["dropped"].items()}
    assert dropped == {"planted-wrong-label": WRONG_ANSWER}
    quarantine = quarantine_records(out)
    assert sorted((q["step"], q["id"], q["reason"]) for q in quarantine) == [
        ("caption", "planted-no-scene", "oracle unavailable"), ("read", None, "corrupt image")]
    assert "row 1" in next(q["detail"] for q in quarantine if q["step"] == "read")

    # a rerun over the finished directory has nothing left to do
    again = run_synthesis(synth_config(data, out), progress=False)
    assert again.processed == 0 and again.already_done == 34 and again.shards_written == 0
    assert kept_rows(out) == got


@pytest.mark.slow
def test_vllm_teacher_captions_with_images(tmp_path, procedural_parquet, tiny_model_dir, ray_local, engines_stopped):
    """The caption step on a vLLM teacher in a Ray Data stage; the stage's actor shuts the
    teacher's engine down when the pipeline ends (killed unstopped, its two /dev/shm queues,
    up to 250 MB each, stayed behind)."""
    rows = pq.read_table(procedural_parquet).to_pylist()[:4]
    data = write_rows(tmp_path / "four.parquet", rows)
    cfg = synth_config(data, tmp_path / "synth", "synth.caption.kind=vllm", f"synth.caption.model={tiny_model_dir}",
                       "synth.caption.dtype=float32", "synth.caption.max_model_len=1024",
                       "synth.caption.enforce_eager=true", "synth.caption.max_tokens=24")
    report = run_synthesis(cfg, progress=False)
    assert report.kept == 4 and report.quarantined == {}, report.summary()
    assert report.teachers["caption"] == f"vllm:{tiny_model_dir}"
    assert report.prompts["caption"].startswith("caption-v1@") and report.prompts["reasoning"] == "oracle"
    got = kept_rows(tmp_path / "synth")
    for row in got.values():
        meta = json.loads(row["meta"])
        assert row["caption"].strip() and row["caption"] != meta["caption"]  # the model wrote it
        assert json.loads(row["teachers"])["caption"] == f"vllm:{tiny_model_dir}"
        assert TARGET_RE.match(row["target"])
    engines_stopped(at_least=1)


@pytest.mark.slow
def test_openai_teacher_pipeline_retries_and_never_leaks_the_key(tmp_path, procedural_parquet, ray_local,
                                                                 monkeypatch, capfd):
    samples = [from_row(r) for r in pq.read_table(procedural_parquet).to_pylist()[:6]]
    answers = {format_question(s): s.answer for s in samples}
    wrong_q, flaky_q, broken_q = (format_question(s) for s in samples[:3])
    key = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("AVAR_TEST_TEACHER_KEY", key)

    def responder(request):
        text = user_text(request)
        if text.startswith("You are describing"):
            return ("Global scan: a small test figure.\nElements: a red circle; a blue square.\n"
                    "Relations: the circle is left of the square.\nSynthesis: two shapes.")
        if text.startswith("You are given"):
            question = text.split("Question:\n", 1)[1].strip()
            answer = answers[question] if question != wrong_q else ("A" if answers[question] != "A" else "B")
            return f"The description lists the elements. I check each one. The answer is {answer}."
        chain = text.split("Reasoning chain:\n", 1)[1].strip()
        if "The answer is B." in chain:
            return "nonsense without the final sentence"  # the rule-based fallback takes over
        body, final = chain.rsplit(". ", 1)
        return f"{body}. Let me look at the red circle again. {final}"

    def failures(request, attempt):
        text = user_text(request)
        if text.startswith("You are describing") and flaky_q in text and attempt == 1:
            return 503
        if text.startswith("You are given") and broken_q in text:
            return 500
        return None

    data = write_rows(tmp_path / "six.parquet", [to_row(s) for s in samples])
    with FakeOpenAI(responder, api_key=key, failures=failures) as server:
        teacher = [f"synth.{step}.{k}={v}" for step in ("caption", "reasoning", "anchor") for k, v in
                   (("kind", "openai"), ("base_url", server.base_url), ("model", "fake-teacher"),
                    ("api_key_env", "AVAR_TEST_TEACHER_KEY"), ("max_retries", 2), ("concurrency", 3),
                    ("timeout_s", 10))]
        report = run_synthesis(synth_config(data, tmp_path / "synth", *teacher), progress=False)
        statuses = list(server.statuses)
        in_flight = server.max_in_flight
    assert report.kept == 4 and report.dropped == {WRONG_ANSWER: 1}, report.summary()
    assert report.quarantined == {"teacher error": 1}
    assert statuses.count(503) == 1 and statuses.count(500) == 3 and in_flight <= 3
    got = kept_rows(tmp_path / "synth")
    assert set(got) == {s.id for s in samples[3:]} | {samples[1].id}  # the flaky row survived its retry
    modes = {rid: row["anchor_mode"] for rid, row in got.items()}
    assert modes.pop(samples[4].id) == "rule-fallback" and set(modes.values()) == {"teacher"}
    for rid, row in got.items():
        assert has_anchor(TARGET_RE.match(row["target"]).group(1))
        assert json.loads(row["teachers"])["reasoning"] == f"openai:fake-teacher@{server.base_url}"
    (record,) = quarantine_records(tmp_path / "synth")
    assert record["id"] == samples[2].id and record["step"] == "reasoning" and "HTTP 500" in record["detail"]

    time.sleep(1.0)  # let Ray forward the actors' output
    captured = capfd.readouterr()
    texts = [captured.out, captured.err, report.summary(), json.dumps(asdict(report))]
    texts += [p.read_bytes().decode("latin-1") for p in (tmp_path / "synth").rglob("*") if p.is_file()]
    # Every Ray process's log of the test Ray's own session (not /tmp/ray/session_latest, which
    # points at whichever local Ray started last: another test's subprocess, another user's).
    context = ray_local.get_runtime_context()
    session_logs = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
    assert session_logs.is_dir(), f"the test Ray's log folder {session_logs} is missing"
    logs = [p for p in session_logs.rglob("*") if p.is_file()]
    assert any(p.name.startswith("worker-") for p in logs), f"no worker logs in {session_logs}"
    texts += [p.read_bytes().decode("latin-1") for p in logs]
    assert not [t for t in texts if key in t], "the API key leaked"
