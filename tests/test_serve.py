"""The Ray Serve app: real HTTP requests on 127.0.0.1 against a deployment of the tiny model on
the shared local Ray; bad requests get 4xx JSON errors naming the field."""
from __future__ import annotations

import base64
import io
import math

import pytest
from PIL import Image

from avar_ray.config import InterventionConfig, ServeConfig, load_config
from avar_ray.data.procedural import generate_samples
from avar_ray.ray_utils import free_port
from avar_ray.serve.validation import RequestError, check_image, from_json
from conftest import visual_tokens

MAX_IMAGE_BYTES = 60_000
MAX_PIXELS = 300 * 300
MAX_PROMPT_CHARS = 8000  # above what the tiny model's 1024-token context holds (one token per "circle ")
IV = InterventionConfig()



def _png(size: tuple[int, int], noise: bool = False) -> bytes:
    if noise:  # incompressible: many bytes for few pixels
        import numpy as np

        pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:  # one colour: a few hundred bytes, however many pixels (a decompression bomb's shape)
        image = Image.new("RGB", size, (200, 30, 30))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sample():
    return generate_samples(1, seed=3)[0]


@pytest.fixture(scope="module")
def serve_url(ray_local, tiny_model_dir):
    from ray import serve

    from avar_ray.serve.app import start_serve

    cfg = load_config(None, ["model.max_model_len=1024", f"serve.port={free_port()}", "serve.max_new_tokens=16",
                             f"serve.max_image_bytes={MAX_IMAGE_BYTES}", f"serve.max_image_pixels={MAX_PIXELS}",
                             "serve.num_cpus=1", f"serve.max_prompt_chars={MAX_PROMPT_CHARS}"])
    url = start_serve(str(tiny_model_dir), cfg, name="avar-test")
    yield url
    serve.shutdown()


def _post(url: str, **kwargs):
    import requests

    return requests.post(url + "answer", timeout=120, **kwargs)


@pytest.mark.slow
def test_answers_a_real_request_on_loopback(serve_url, sample, tiny_model_dir):
    import psutil
    import requests

    assert serve_url.startswith("http://127.0.0.1:")
    port = int(serve_url.split(":")[2].split("/")[0])
    listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, f"Serve listens on {listening}, not loopback only"
    assert requests.get(serve_url + "health", timeout=30).json()["status"] == "ok"

    body = {"image": base64.b64encode(sample.images[0]).decode(), "question": sample.question,
            "choices": sample.choices, "max_new_tokens": 8}
    plain = _post(serve_url, json=body)
    assert plain.status_code == 200, plain.text
    out = plain.json()
    assert set(out) >= {"answer", "response", "vas", "alpha_img", "eps_img", "per_layer", "user"}
    assert 1 <= out["response_tokens"] <= 8 and isinstance(out["response"], str)
    assert math.isfinite(out["vas"]) and out["vas"] > 0 and 0 < out["alpha_img"] < 1
    assert out["layers"] == [0, 1, 2, 3] and len(out["per_layer"]) == 4
    n_v = visual_tokens(tiny_model_dir, sample.images[0])  # |V| from the image processor's grid
    assert out["visual_tokens"] == n_v and out["eps_img"] == pytest.approx(out["alpha_img"] / n_v)

    # Per-request intervention: the prompt's visual share of attention goes up as asked.
    boosted = _post(serve_url, json={**body, "intervention": {"a_img": 0.5, "a_sys": 0.4}})
    assert boosted.status_code == 200, boosted.text
    assert boosted.json()["intervention"]["a_img"] == 0.5
    assert boosted.json()["user"]["alpha_img"] > out["user"]["alpha_img"]

    # The same request as multipart/form-data.
    form = _post(serve_url, files={"image": ("x.png", sample.images[0], "image/png")},
                 data={"question": sample.question, "max_new_tokens": "8"})
    assert form.status_code == 200, form.text
    assert math.isfinite(form.json()["vas"])


@pytest.mark.slow
def test_rejects_oversized_image_and_malformed_bodies(serve_url, sample):
    big = _png((160, 160), noise=True)
    assert len(big) > MAX_IMAGE_BYTES
    r = _post(serve_url, json={"image": base64.b64encode(big).decode(), "question": "q"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "image"

    bomb = _png((4000, 4000))  # few bytes, 16 M pixels: refused from the header
    assert len(bomb) < MAX_IMAGE_BYTES
    r = _post(serve_url, files={"image": ("b.png", bomb, "image/png")}, data={"question": "q"})
    assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]

    r = _post(serve_url, data=b'{"image": "abc", "question": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"

    good_image = base64.b64encode(sample.images[0]).decode()
    cases = [({"image": good_image}, "question"),
             ({"image": "***not base64***", "question": "q"}, "image"),
             ({"image": good_image, "question": "q", "max_new_tokens": 10_000}, "max_new_tokens"),
             ({"image": good_image, "question": "q", "intervention": {"a_sys": 1.0}}, "intervention.a_sys"),
             ({"image": good_image, "question": "q", "intervention": {"layers": [99]}}, "intervention.layers"),
             ({"image": good_image, "question": "q", "temperature": 2}, "temperature"),
             ({"image": good_image, "question": "x" * (MAX_PROMPT_CHARS + 1)}, "question"),  # characters
             ({"image": good_image, "question": "circle " * 1100}, "question")]  # tokens: no room to answer
    for body, field in cases:
        r = _post(serve_url, json=body)
        assert r.status_code == 400, (body.keys(), r.text)
        assert r.json()["error"]["field"] == field
    assert "leaves no room for the response" in r.json()["error"]["message"]  # the last case: tokens

    r = _post(serve_url, data="question=q", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def test_validation_without_ray(sample):
    cfg = ServeConfig(max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_PIXELS, max_prompt_chars=20)
    image = base64.b64encode(sample.images[0])
    req = from_json(b'{"image": "%s", "question": "How many?", "intervention": null}' % image, cfg, IV)
    assert req.image.mode == "RGB" and req.intervention is None and req.max_new_tokens == cfg.max_new_tokens
    # what a request leaves out comes from the run's intervention section, not the schema's defaults
    run_iv = InterventionConfig(a_img=0.3, a_sys=0.2, layers=[1])
    req = from_json(b'{"image": "%s", "question": "q", "intervention": {"a_sys": 0.1}}' % image, cfg, run_iv)
    assert (req.intervention.a_img, req.intervention.a_sys, req.intervention.layers) == (0.3, 0.1, (1,))
    req = from_json(b'{"image": "%s", "question": "q", "intervention": {"layers": null}}' % image, cfg, run_iv)
    assert req.intervention.layers is None  # null: all layers
    with pytest.raises(RequestError) as exc:
        from_json(b'{"image": "AAAA", "question": "%s"}' % (b"x" * 21), cfg, IV)
    assert exc.value.field == "question" and exc.value.status == 400
    with pytest.raises(RequestError) as exc:
        check_image(_png((400, 400)), cfg)
    assert exc.value.status == 413
    with pytest.raises(RequestError) as exc:
        check_image(sample.images[0][:60], cfg)  # truncated PNG
    assert exc.value.status == 400 and exc.value.field == "image"
