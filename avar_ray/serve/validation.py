"""Turning an HTTP request body into a checked ``AnswerRequest``, or a 4xx error that names the
bad field. Pure functions (no Ray, no model): the Serve app calls them, tests can too.

Two body forms:

* JSON: ``{"image": "<base64, or a data: URL>", "question": "...", "choices": ["...", ...],
  "max_new_tokens": 64, "intervention": {"a_img": 0.15, "a_sys": 0.4, "layers": [0, 1]}}``
* multipart/form-data: an ``image`` file part, a ``question`` field, and optional
  ``choices`` (a JSON list), ``max_new_tokens``, ``a_img``, ``a_sys``, ``layers`` (a JSON list).

An intervention field a request leaves out comes from the run's ``intervention`` section (a
request that asks for the intervention gets the configured a_img, a_sys and layers).

Limits (``ServeConfig``): image bytes, image pixels (read from the file header before any
pixel is decoded, so a decompression bomb is refused without being expanded), question
characters, new tokens.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from PIL import Image

from avar_ray.attention import Intervention
from avar_ray.config import InterventionConfig, ServeConfig
from avar_ray.data.schema import LETTERS, ImageDecodeError, decode_image

JSON_FIELDS = ("image", "question", "choices", "max_new_tokens", "intervention")
FORM_FIELDS = ("image", "question", "choices", "max_new_tokens", "a_img", "a_sys", "layers")


class RequestError(Exception):
    """A bad request: HTTP ``status`` (4xx), the offending ``field`` and a message."""

    def __init__(self, status: int, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.status = status
        self.field = field_name
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": self.message}}


@dataclass
class AnswerRequest:
    image: Image.Image  # decoded RGB
    image_bytes: bytes  # the file as sent (checked)
    question: str
    choices: list[str]
    max_new_tokens: int  # serve.max_new_tokens unless the request asks for fewer
    intervention: Optional[Intervention] = None


def max_body_bytes(cfg: ServeConfig) -> int:
    """The largest body worth reading: a base64 image at the limit plus the text fields."""
    return cfg.max_image_bytes * 4 // 3 + 4 * cfg.max_prompt_chars + 64 * 1024


def check_image(data: bytes, cfg: ServeConfig) -> Image.Image:
    """Decoded RGB image, or 413 (too many bytes or pixels) / 400 (not an image)."""
    if len(data) == 0:
        raise RequestError(400, "image", "the image is empty")
    if len(data) > cfg.max_image_bytes:
        raise RequestError(413, "image", f"{len(data)} bytes exceeds the limit of {cfg.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                width, height = probe.size
    except Image.DecompressionBombError as exc:
        raise RequestError(413, "image", f"refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RequestError(400, "image", f"not a readable image: {exc}") from None
    if width * height > cfg.max_image_pixels:
        raise RequestError(413, "image", f"{width}x{height} = {width * height} pixels exceeds the limit of "
                                         f"{cfg.max_image_pixels}")
    try:
        return decode_image(data, max_pixels=cfg.max_image_pixels)
    except ImageDecodeError as exc:
        raise RequestError(400, "image", str(exc)) from None


def decode_base64_image(value: Any, cfg: ServeConfig) -> bytes:
    if not isinstance(value, str) or not value:
        raise RequestError(400, "image", "expected a base64 string (or a data: URL)")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if ";base64" not in head:
            raise RequestError(400, "image", "a data: URL must be base64-encoded")
    if len(value) > cfg.max_image_bytes * 4 // 3 + 4:  # refuse before decoding
        raise RequestError(413, "image", f"base64 of more than {cfg.max_image_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, "image", f"not valid base64: {exc}") from None


def _question(value: Any, cfg: ServeConfig) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(400, "question", "expected a non-empty string")
    if len(value) > cfg.max_prompt_chars:
        raise RequestError(400, "question", f"{len(value)} characters exceeds the limit of {cfg.max_prompt_chars}")
    return value


def _choices(value: Any, cfg: ServeConfig) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise RequestError(400, "choices", "expected a list of strings")
    if len(value) > len(LETTERS):
        raise RequestError(400, "choices", f"{len(value)} choices; at most {len(LETTERS)}")
    if sum(len(c) for c in value) > cfg.max_prompt_chars:
        raise RequestError(400, "choices", f"longer than {cfg.max_prompt_chars} characters in all")
    return list(value)


def _max_new_tokens(value: Any, cfg: ServeConfig) -> int:
    if value is None:
        return cfg.max_new_tokens
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cfg.max_new_tokens:
        raise RequestError(400, "max_new_tokens", f"expected an integer in [1, {cfg.max_new_tokens}], got {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, name, f"expected a number, got {value!r}")
    return float(value)


def _intervention(value: Any, configured: InterventionConfig) -> Optional[Intervention]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(400, "intervention", "expected an object {a_img, a_sys[, layers]} or null")
    unknown = sorted(set(value) - {"a_img", "a_sys", "layers"})
    if unknown:
        raise RequestError(400, f"intervention.{unknown[0]}", "unknown field (known: a_img, a_sys, layers)")
    a_img = _number(value.get("a_img", configured.a_img), "intervention.a_img")
    a_sys = _number(value.get("a_sys", configured.a_sys), "intervention.a_sys")
    if not a_img > -1:
        raise RequestError(400, "intervention.a_img", f"must be > -1, got {a_img}")
    if not 0 <= a_sys < 1:
        raise RequestError(400, "intervention.a_sys", f"must be in [0, 1), got {a_sys}")
    layers = value["layers"] if "layers" in value else configured.layers  # null: all layers
    if layers is not None and (not isinstance(layers, list) or not layers
                               or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise RequestError(400, "intervention.layers", "expected a non-empty list of layer indices or null")
    return Intervention(a_img=a_img, a_sys=a_sys, layers=None if layers is None else tuple(layers))


def from_json(body: bytes, cfg: ServeConfig, intervention: InterventionConfig) -> AnswerRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "body", f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "body", "expected a JSON object")
    unknown = sorted(set(data) - set(JSON_FIELDS))
    if unknown:
        raise RequestError(400, unknown[0], f"unknown field (known: {', '.join(JSON_FIELDS)})")
    if "image" not in data:
        raise RequestError(400, "image", "missing")
    if "question" not in data:
        raise RequestError(400, "question", "missing")
    question = _question(data["question"], cfg)  # cheap checks first, then the image
    choices = _choices(data.get("choices"), cfg)
    max_new = _max_new_tokens(data.get("max_new_tokens"), cfg)
    iv = _intervention(data.get("intervention"), intervention)
    data_bytes = decode_base64_image(data["image"], cfg)
    return AnswerRequest(check_image(data_bytes, cfg), data_bytes, question, choices, max_new, iv)


def _json_field(text: Optional[str], name: str) -> Any:
    if text is None or text == "":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise RequestError(400, name, f"expected JSON, got {text[:50]!r}") from None


def from_form(fields: Mapping[str, str], image: Optional[bytes], cfg: ServeConfig,
              intervention: InterventionConfig) -> AnswerRequest:
    """``fields``: the text parts; ``image``: the file part's bytes (None when absent)."""
    unknown = sorted(set(fields) - set(FORM_FIELDS))
    if unknown:
        raise RequestError(400, unknown[0], f"unknown field (known: {', '.join(FORM_FIELDS)})")
    if image is None:
        raise RequestError(400, "image", "missing (send it as a file part named 'image')")
    if "question" not in fields:
        raise RequestError(400, "question", "missing")
    question = _question(fields["question"], cfg)
    choices = _choices(_json_field(fields.get("choices"), "choices"), cfg)
    max_new = _max_new_tokens(_json_field(fields.get("max_new_tokens"), "max_new_tokens"), cfg)
    iv = {k: _json_field(fields.get(k), k) for k in ("a_img", "a_sys", "layers") if fields.get(k) not in (None, "")}
    return AnswerRequest(check_image(image, cfg), image, question, choices, max_new,
                         _intervention(iv, intervention) if iv else None)
