"""The warm base sees: it clears its chance baselines on held-out tasks, and its answers depend
on the image (held-out loss with the images shuffled between samples is higher than with the
right ones). Both are measured here, on the weights in the folder, on a procedural set drawn at
test time (seeds neither its training stream nor its build-time check uses), never read from the
``warm_base.json`` the build wrote. Measured on the default warm base: loss 0.0436 with the right
images, 0.2473 shuffled. The old recipe (no vision pre-training) failed both: the two losses
were equal to four decimals.

The cache: its key changes with the project files that build the base (warm_base.SOURCES), and
two builders of one key at once build it once, the second one reusing the first one's folder.
"""
from __future__ import annotations

import random

import pytest
import torch

from avar_ray.warm_base import read_info

HELD_OUT_SEED = 31_337  # not warm_base.TRAIN_SEED_OFFSET's stream, nor CHECK_SEED_OFFSET's set


def _held_out(warm_base_dir, n: int):
    from avar_ray.data.procedural import generate_samples

    settings = read_info(warm_base_dir)["settings"]
    return generate_samples(n, seed=HELD_OUT_SEED, image_size=settings["image_size"], chain="short",
                            tasks=settings["tasks"])


@pytest.fixture(scope="module")
def base(warm_base_dir):
    from avar_ray.modeling import load_model, load_processor

    return load_processor(str(warm_base_dir)), load_model(str(warm_base_dir)).eval()


@pytest.mark.slow
def test_warm_base_clears_twice_the_better_chance_baseline(warm_base_dir, base):
    """Greedy answers of the folder's weights on 48 fresh samples, scored by rewards/."""
    from avar_ray.warm_base import answer, baselines
    from rewards import accuracy_reward

    processor, model = base
    samples = _held_out(warm_base_dir, 48)
    texts = answer(model, processor, samples)
    accuracy = sum(accuracy_reward(t, s.answer, s.answer_type, s.choices or None, s.precision)
                   for t, s in zip(texts, samples)) / len(samples)
    chance = baselines(samples)
    better = max(chance["random"], chance["most_frequent"])
    print(f"held-out accuracy {accuracy:.3f}; chance {chance}")
    assert accuracy >= 2 * better, (accuracy, chance, texts[:4])


@pytest.mark.slow
@torch.no_grad()
def test_warm_base_answers_depend_on_the_image(warm_base_dir, base):
    from avar_ray.sft.data import encode_rows
    from avar_ray.warm_base import _rows

    processor, model = base
    rows = _rows(_held_out(warm_base_dir, 32))
    images = [r["images"] for r in rows]
    random.Random(0).shuffle(images)
    shuffled = [{**r, "images": im} for r, im in zip(rows, images)]

    def loss(batch):
        encoded, labels = encode_rows(processor, batch)
        return model(**encoded.inputs, labels=labels, use_cache=False).loss.item()

    right, wrong = loss(rows), loss(shuffled)
    print(f"held-out loss: right images {right:.4f}, shuffled {wrong:.4f}")
    assert wrong > right + 0.02, (right, wrong)


def test_cache_key_follows_the_sources_that_build_the_base(monkeypatch, tmp_path):
    """Editing a file that builds the base (here: a copy of the package's tiny_model.py with
    one byte more) gives another cache folder; the settings alone would not."""
    from avar_ray import warm_base
    from avar_ray.config import WarmBaseConfig

    wb = WarmBaseConfig(cache_dir=str(tmp_path))
    before = warm_base.cache_key(wb, 64)
    assert "tiny_model.py" in warm_base.SOURCES and "data/procedural.py" in warm_base.SOURCES
    real_read = warm_base.Path.read_bytes

    def edited(path):
        data = real_read(path)
        return data + b"#" if path.name == "tiny_model.py" else data

    monkeypatch.setattr(warm_base.Path, "read_bytes", edited)
    assert warm_base.cache_key(wb, 64) != before
    monkeypatch.undo()
    assert warm_base.cache_key(wb, 64) == before


def test_two_builders_of_one_key_build_it_once(monkeypatch, tmp_path):
    """Two threads call ensure_warm_base for the same key at once: one builds (slowly, a stand-in
    build that writes the info file), the other waits for it and reuses its folder; no partial
    or temporary folder is left and the build ran once."""
    import json
    import threading
    import time

    from avar_ray import warm_base
    from avar_ray.config import WarmBaseConfig

    builds = []

    def fake_build(out, wb, image_size):
        builds.append(out)
        time.sleep(1.0)  # long enough for the second caller to arrive while this one builds
        info = {"seconds": 1.0, "check": {"accuracy": 1.0, "n": 1, "baselines": {"random": 0, "most_frequent": 0},
                                          "vas_user": 0.0}}
        (out / warm_base.INFO).write_text(json.dumps(info))
        return info

    monkeypatch.setattr(warm_base, "build_warm_base", fake_build)
    wb = WarmBaseConfig(cache_dir=str(tmp_path))
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(warm_base.ensure_warm_base(wb, 64))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1, builds
    assert got[0] == got[1] == warm_base.cache_path(wb, 64) and (got[0] / warm_base.INFO).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([got[0].name, f"{got[0].name}.lock"])
