"""What the synthesis steps ask of a model teacher: OpenAI-format chat requests in, text out.

The ``vllm`` and ``openai`` teachers take the same request (images as ``data:`` URLs), so a
step's prompt building does not depend on where its teacher runs. A failed request comes
back as a ``TeacherError`` in its slot: one bad row does not fail its batch.
"""
from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from typing import Protocol, Sequence
from urllib.parse import urlsplit, urlunsplit

from PIL import Image

from avar_ray.data.fields import RowError
from avar_ray.data.schema import IMAGE_PLACEHOLDER, decode_image


class TeacherError(RowError):
    """A row a teacher could not answer; ``reason`` is the counted category."""


@dataclass(frozen=True)
class ChatRequest:
    messages: list  # OpenAI chat format; image parts as {"type": "image_url", ...}
    max_tokens: int
    temperature: float
    seed: int  # per row, so that a rerun samples the same text


class Teacher(Protocol):
    name: str  # provenance: kind and model, never a secret

    def complete(self, requests: list[ChatRequest]) -> list[str | TeacherError]: ...

    def close(self) -> None: ...


def row_seed(row_id: str, base_seed: int, step: str) -> int:
    """A stable 31-bit sampling seed per (row, step, run seed)."""
    digest = hashlib.sha1(f"{base_seed}:{step}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def image_data_url(data: bytes) -> str:
    """A ``data:`` URL of encoded image bytes; raises ImageDecodeError for a bad image."""
    decode_image(data)  # validates (corrupt, truncated or huge images fail here)
    with Image.open(io.BytesIO(data)) as probe:
        mime = Image.MIME.get(probe.format or "", "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def user_message(text: str, images: Sequence[bytes] = ()) -> list[dict]:
    """One user turn: the images first, in order, then the text. An EasyR1/verl question marks
    its images with ``<image>``; the teacher gets each marker as a reference, ``[image]`` (``[image
    k]`` with several), in every step, since a literal ``<image>`` must not reach it: its chat
    template renders the image parts itself, and for some processors (LLaVA's) the string is the
    image token. (The policy's prompt puts each image at its marker: ``schema.user_content``;
    here the prompt templates wrap the question, and an image inside their sentences would
    split them.)"""
    pieces = text.split(IMAGE_PLACEHOLDER)
    refs = [f"[image {k}]" if len(pieces) > 2 else "[image]" for k in range(1, len(pieces))]
    text = pieces[0] + "".join(ref + piece for ref, piece in zip(refs, pieces[1:]))
    content: list[dict] = [{"type": "image_url", "image_url": {"url": image_data_url(b)}} for b in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def public_url(url: str) -> str:
    """The URL without user:password, for provenance and messages."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def teacher_name(cfg) -> str:
    """Provenance name of a TeacherConfig: kind and model, never a secret."""
    if cfg.kind == "oracle":
        return "oracle"
    if cfg.kind == "vllm":
        return f"vllm:{cfg.model}"
    return f"openai:{cfg.model}@{public_url(cfg.base_url)}"
