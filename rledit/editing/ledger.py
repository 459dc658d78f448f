"""The ledger: committed factored updates in order, applied through fp32 masters, revertible bit-exactly.

Each committed update goes through the fused kernel into an fp32 master of every edited weight and is
cast into the model's own dtype in the same pass, so low-precision weights never accumulate rounding
drift. Reverting subtracts nothing: it restores the originals and replays the updates that remain, in
order, with the same deterministic kernel, so the weights are bit-identical to what they were.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rledit.editing.update import FactoredUpdate, ModuleUpdate, check_finite
from rledit.errors import EditRefusedError, RleditError
from rledit.kernels import fused_lowrank_update_

_FORMAT = "rledit-ledger/1"


class UpdateLedger:
    """Commits, reverts, saves and loads factored updates on a set of weights.

    `weights` maps module names to their weights as (d_out x d_in) tensors or views (GPT-2's Conv1D
    passes `weight.T`). An fp32 weight is its own master; others get an fp32 master copy.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], backend: str = "auto"):
        self._weights = {name: w.data for name, w in weights.items()}
        self._originals = {name: w.detach().clone() for name, w in self._weights.items()}
        self._masters = {name: w if w.dtype == torch.float32 else w.float()
                         for name, w in self._weights.items()}
        self._updates: list[FactoredUpdate] = []
        self.backend = backend

    def __len__(self) -> int:
        return len(self._updates)

    @property
    def updates(self) -> list[FactoredUpdate]:
        return list(self._updates)

    @property
    def names(self) -> list[str]:
        return list(self._weights)

    def commit(self, update: FactoredUpdate) -> int:
        """Apply `update` to the weights and record it; returns its index. Refused updates change nothing."""
        self._validate(update)
        stored = {name: _stored_copy(u, self._masters[name]) for name, u in update.items()}
        self._apply(stored)
        self._updates.append(stored)
        return len(self._updates) - 1

    def revert(self, k: int | None = None) -> None:
        """Undo the last `k` committed updates (all when None); the weights become bit-identical to before."""
        k = len(self._updates) if k is None else k
        if not 0 <= k <= len(self._updates):
            raise RleditError(f"cannot revert {k} updates: the ledger holds {len(self._updates)}")
        keep = self._updates[: len(self._updates) - k]
        with torch.no_grad():
            for name, weight in self._weights.items():
                original = self._originals[name]
                weight.copy_(original)
                if self._masters[name] is not weight:
                    self._masters[name].copy_(original)
        self._updates = []
        for update in keep:
            self._apply(update)
            self._updates.append(update)

    def cumulative_norms(self) -> dict[str, float]:
        """Frobenius norm of the total committed change of each weight (a collapse signal)."""
        return {name: float(torch.linalg.matrix_norm(self._masters[name] - self._originals[name].float()))
                for name in self._weights}

    def save(self, path: str | Path, start: int = 0) -> None:
        """Export the committed updates from index `start` on, in order, as one safetensors file (`load` on a
        ledger holding the first `start` gives back all of them)."""
        tensors: dict[str, torch.Tensor] = {}
        alphas = []
        for i, update in enumerate(self._updates[start:]):
            alphas.append({name: u.alpha for name, u in update.items()})
            for name, u in update.items():
                tensors[f"{i}/{name}/P"] = u.P.contiguous().cpu()
                tensors[f"{i}/{name}/Q"] = u.Q.contiguous().cpu()
                if u.scale is not None:
                    tensors[f"{i}/{name}/scale"] = u.scale.contiguous().cpu()
        save_file(tensors, str(path), metadata={"format": _FORMAT, "alphas": json.dumps(alphas)})

    def load(self, path: str | Path) -> int:
        """Commit every update saved in `path`, in order; returns how many."""
        updates = load_updates(path)
        for update in updates:
            self.commit(update)
        return len(updates)

    def _validate(self, update: FactoredUpdate) -> None:
        unknown = sorted(set(update) - set(self._weights))
        if unknown:
            raise EditRefusedError(f"update refused: unknown modules {', '.join(unknown)}; "
                                   f"the ledger edits {', '.join(self._weights)}")
        for name, u in update.items():
            d_out, d_in = self._weights[name].shape
            if u.P.ndim != 2 or u.Q.ndim != 2 or u.P.shape != (u.Q.shape[0], d_out) or u.Q.shape[1] != d_in:
                raise EditRefusedError(f"update refused: factors of {name} have shapes P {tuple(u.P.shape)}, "
                                       f"Q {tuple(u.Q.shape)}; expected (N, {d_out}) and (N, {d_in})")
        check_finite(update)
        bad = [name for name, u in update.items() if not torch.isfinite(u.detach().frobenius_sq())]
        if bad:
            raise EditRefusedError(f"update refused: the update of {', '.join(bad)} overflows; "
                                   "the model was not changed")

    def _apply(self, update: FactoredUpdate) -> None:
        with torch.no_grad():
            for name, u in update.items():
                weight = self._weights[name]
                master = self._masters[name]
                fused_lowrank_update_(master, None if master is weight else weight, u.P, u.Q, u.scale,
                                      u.alpha, u.row_mask, backend=self.backend)


def _stored_copy(update: ModuleUpdate, master: torch.Tensor) -> ModuleUpdate:
    """Private fp32 copies of the factors on the weights' device, masked rows folded into the scale.

    An update with more rows than the weight's smaller side (many rounds, long batches) is stored as its dense
    product factored through an identity, which is then smaller; the ledger replays what it stored, so reverts
    stay bit-exact."""
    def own(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(master.device, torch.float32, copy=True)

    P, Q, scale = own(update.P), own(update.Q), own(update.masked_scale())
    d_out, d_in = master.shape
    if P.shape[0] > min(d_out, d_in):
        dense = (P.T * scale) @ Q
        identity = torch.eye(min(d_out, d_in), device=master.device)
        P, Q = (identity, dense) if d_out <= d_in else (dense.T.contiguous(), identity)
        scale = torch.ones(identity.shape[0], device=master.device)
    return ModuleUpdate(P, Q, scale, float(update.alpha))


def load_updates(path: str | Path) -> list[FactoredUpdate]:
    """Read the updates a ledger saved, in order."""
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:  # safetensors metadata lives in the JSON header
            header_len = int.from_bytes(f.read(8), "little")
            metadata = json.loads(f.read(header_len)).get("__metadata__", {})
    except (OSError, ValueError) as exc:
        raise RleditError(f"cannot read ledger file {path}: {exc}") from exc
    if metadata.get("format") != _FORMAT:
        raise RleditError(f"{path} is not an rledit ledger (format {metadata.get('format')!r})")
    updates: list[FactoredUpdate] = []
    for i, alphas in enumerate(json.loads(metadata["alphas"])):
        updates.append({name: ModuleUpdate(tensors[f"{i}/{name}/P"], tensors[f"{i}/{name}/Q"],
                                           tensors.get(f"{i}/{name}/scale"), float(alpha))
                        for name, alpha in alphas.items()})
    return updates
