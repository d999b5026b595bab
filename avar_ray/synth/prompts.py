"""Prompt files of the synthesis teachers (configs/prompts/*.txt).

A prompt file starts with a version line, ``# version: NAME``, kept as provenance in every row
it helped write; the rest is a template with ``{field}`` slots filled by ``str.format``
(literal braces are written ``{{``/``}}``).
"""
from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_VERSION_RE = re.compile(r"^#\s*version:\s*(\S+)\s*$")
# The slots each step fills; a template naming any other slot is rejected when loaded.
STEP_FIELDS = {
    "caption": {"question"},
    "reasoning": {"question", "caption", "answer_hint"},
    "anchor": {"question", "caption", "reasoning"},
}


class PromptError(ValueError):
    """A prompt file is missing, has no version line, or uses an unknown slot."""


@dataclass(frozen=True)
class Prompt:
    path: str
    version: str
    template: str

    @property
    def provenance(self) -> str:
        """``version@hash``: the version line plus a short hash of the exact text used."""
        digest = hashlib.sha1(self.template.encode()).hexdigest()[:8]
        return f"{self.version}@{digest}"

    def render(self, **values: str) -> str:
        return self.template.format(**values)


def resolve_path(path: str, what: str) -> Path:
    """A relative path is looked up in the working directory, then in the repository."""
    if not path:
        raise PromptError(f"{what}: no prompt file configured")
    candidate = Path(path)
    for p in ([candidate] if candidate.is_absolute() else [Path.cwd() / candidate, REPO / candidate]):
        if p.is_file():
            return p
    raise PromptError(f"{what}: prompt file not found: {path}")


def load_prompt(path: str, step: str, what: str) -> Prompt:
    """Read and check a prompt file; ``what`` names the config field in error messages."""
    file = resolve_path(path, what)
    lines = file.read_text(encoding="utf-8").splitlines()
    match = _VERSION_RE.match(lines[0]) if lines else None
    if match is None:
        raise PromptError(f"{what}: {file} must start with a '# version: NAME' line")
    template = "\n".join(lines[1:]).strip() + "\n"
    slots = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = slots - STEP_FIELDS[step]
    if unknown:
        raise PromptError(f"{what}: {file} uses unknown slot(s) {sorted(unknown)}; "
                          f"a {step} prompt may use {sorted(STEP_FIELDS[step])}")
    return Prompt(str(file), match.group(1), template)
