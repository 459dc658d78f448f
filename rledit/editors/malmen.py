"""MALMEN: the ridge editor meta-trained with the one-step objective (edit loss + locality KL)."""

from __future__ import annotations

from rledit.editors.ridge import RidgeEditor


class MalmenEditor(RidgeEditor):
    """Ridge aggregation of hypernetwork-transformed factors; trained one edit batch at a time."""

    objective = "one_step"
