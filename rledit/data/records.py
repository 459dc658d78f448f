"""The one edit-record type every dialect is converted into."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LocalityPair:
    """A prompt unrelated to the edit and its true answer (the model should keep answering it)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRecord:
    """One edit request.

    `target_new` is what the edited model should say after `prompt`; targets are stored without the
    leading space, which tokenization adds. `rephrase_prompts` should also yield `target_new`;
    `locality` pairs should keep their answers.
    """

    record_id: str
    prompt: str
    target_new: str
    target_true: str | None = None
    subject: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[LocalityPair, ...] = field(default_factory=tuple)
