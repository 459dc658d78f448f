"""The editor interface: an edit batch in, a factored update of the edited modules out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from rledit.editing.update import FactoredUpdate
from rledit.errors import DataError


@dataclass
class EditContext:
    """What an editor may prepare itself with before the first timed edit of a run.

    `statistics` computes (or reads from its cache) the preserved-knowledge second moments of edited
    modules (see rledit.models.statistics); None where the run configured none.
    """

    model: nn.Module
    tokenizer: Any
    modules: Mapping[str, nn.Module]
    statistics: Any = None


class Editor(nn.Module, ABC):
    """Base class of every editor.

    `predict_update` turns an edit batch (a TokenizedBatch) into a factored update of the edited modules on
    the current model; it never mutates the model. `committed` / `reverted` tell the editor what became of
    its updates, so editors that remember earlier edits of a sequence stay in step with the weights.
    """

    trainable: bool = False
    needs_subject: bool = False
    """Whether every edit request must name a subject that its prompt contains."""

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]]):
        super().__init__()
        self.module_shapes = {name: tuple(shape) for name, shape in module_shapes.items()}

    def check_subjects(self, batch) -> None:
        """Refuse an edit batch (a TokenizedBatch) with a row whose prompt does not contain its subject."""
        if batch.subject_last is None or bool((batch.subject_last < 0).any()):
            rows = "all" if batch.subject_last is None else \
                ", ".join(str(i) for i in (batch.subject_last < 0).nonzero().flatten().tolist())
            raise DataError(f"{type(self).__name__} reads keys at the subject's last token, but the prompts of "
                            f"edit row(s) {rows} of this batch do not contain their subject", field="subject")

    def setup(self, context: EditContext) -> None:
        """Called once with the experiment before any timed edit (statistics, prompts of its own)."""

    @property
    def needs_calibration(self) -> bool:
        """Whether the next prediction will also set the editor's step sizes (training starts with one, so
        every process begins from the same editor)."""
        return False

    @abstractmethod
    def predict_update(self, model: nn.Module, modules: Mapping[str, nn.Module], batch) -> FactoredUpdate:
        """The factored update for `batch` on the current weights."""

    def committed(self) -> None:
        """The update last predicted was committed. Editors that remember earlier edits record it here."""

    def reverted(self, k: int | None = None) -> None:
        """The last `k` commits were reverted; None: all of them, the weights are the originals and a new
        edit sequence starts (also said when a session or a training rollout begins)."""

    def report(self) -> dict[str, Any]:
        """What results.json should say about this editor beyond its config (statistics used, ranks)."""
        return {}

    def snapshot(self) -> Any:
        """Whatever `restore` needs to undo a prediction that was then refused (by default the state dict;
        editors whose state changes only on commit return nothing to copy)."""
        return {name: value.clone() for name, value in self.state_dict().items()}

    def restore(self, snapshot: Any) -> None:
        self.load_state_dict(snapshot)

    def sequence_state(self) -> dict[str, Any]:
        """What the commits of the current sequence taught this editor, for continuing an interrupted run
        exactly where it stopped (written with torch.save): the state dict, plus what subclasses keep outside it."""
        return {"state_dict": self.state_dict()}

    def load_sequence_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["state_dict"])
