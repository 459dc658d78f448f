"""RLEdit: the ridge editor trained as a policy over whole sequences of edits (sequence-level reward)."""

from __future__ import annotations

from rledit.editors.ridge import RidgeEditor


class RLEditEditor(RidgeEditor):
    """Same network and aggregation as MALMEN; the training objective sums discounted per-step rewards."""

    objective = "sequence"
