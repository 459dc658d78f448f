"""The locate-then-edit family (ROME, MEMIT, EMMET, AlphaEdit): keys at the subject's last token, a target
value for the residual stream after the last edited layer found by optimisation, and a closed-form update of
each edited MLP output projection that writes its share of the way there.

For an edit batch of N requests:
1. `z`: for each request, the output of the last edited layer's block at the subject's last token that makes
   the model say the new target, `z = h + delta`. One `delta` per request, all optimised together (one
   forward/backward per step for the whole batch): target NLL on the prompt and on `num_prefixes` prompts
   behind short texts the model wrote itself, plus `kl_factor` x KL keeping "<subject> is a" predictions,
   plus weight decay on ||delta|| / ||h||, with ||delta|| <= clamp_norm x ||h||.
2. For each edited module in model order: keys K (N x d_in, the module's input at the subject's last token,
   averaged over the prompts) and the block's current output at the subject on the model with the earlier
   modules' updates applied; residuals R = (z - current) / (modules left, this one included); the
   subclass's `solve` turns (K, R) into the module's factored update dW = P^T Q.
Every update stays factored (rank N) until the ledger commits it. `edit_memory` > 0 keeps the Gram of the
keys committed earlier in the sequence (AlphaEdit's cache, sequential MEMIT), reset for every new sequence.
`key_token=prompt` reads keys and writes z at the prompt's last token instead of the subject's.
`module_groups` > 1 splits the edited modules into consecutive groups that take the sequence's steps in turn
(`steps_per_group` commits each, cycling), so each group's null space and key memory hold only its share of
the edits; z is then written after the active group's last layer.
"""

from __future__ import annotations

import copy
import inspect
from abc import abstractmethod
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rledit.data.collate import IGNORE_INDEX, TokenizedBatch, pad_right
from rledit.data.text import sampled_token_rows
from rledit.editing.functional import functional_update
from rledit.editing.losses import output_logits
from rledit.editing.update import FactoredUpdate, ModuleUpdate, refuse_non_finite, row_clamp_factors
from rledit.editors.base import EditContext, Editor
from rledit.editors.key_memory import KeyMemory
from rledit.errors import ConfigError, DataError

# Where keys are read and z is written: the subject's last token (the published methods: where real models
# recall facts about the subject), or the prompt's last token (for models that look facts up there instead).
KEY_TOKENS = ("subject", "prompt")


class LocateEditor(Editor):
    """Shared machinery of ROME, MEMIT, EMMET and AlphaEdit; subclasses implement `solve`."""

    needs_subject = True

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], mom2_weight: float = 1e4,
                 edit_memory: float = 0.0, z_steps: int = 25, z_lr: float = 0.5, clamp_norm: float = 4.0,
                 kl_factor: float = 0.0625, weight_decay: float = 0.5, num_prefixes: int = 5,
                 prefix_length: int = 10, kl_suffix: str = " is a", early_stop_nll: float = 0.05, seed: int = 0,
                 key_token: str = "subject", module_groups: int = 1, steps_per_group: int = 1):
        super().__init__(module_shapes)
        if key_token not in KEY_TOKENS:
            raise ConfigError(f"{type(self).__name__}: key_token must be one of {list(KEY_TOKENS)}, got {key_token!r}")
        if module_groups < 1 or steps_per_group < 1 or len(self.module_shapes) % module_groups:
            raise ConfigError(f"{type(self).__name__}: module_groups ({module_groups}) must divide the "
                              f"{len(self.module_shapes)} edited modules and steps_per_group ({steps_per_group}) "
                              "must be >= 1")
        if z_steps < 1 or z_lr <= 0 or clamp_norm <= 0 or num_prefixes < 0 or prefix_length < 1 or mom2_weight < 0:
            raise ConfigError(f"{type(self).__name__}: need z_steps >= 1, z_lr > 0, clamp_norm > 0, "
                              f"num_prefixes >= 0, prefix_length >= 1 and mom2_weight >= 0")
        self.options = {"mom2_weight": mom2_weight, "edit_memory": edit_memory, "z_steps": z_steps, "z_lr": z_lr,
                        "clamp_norm": clamp_norm, "kl_factor": kl_factor, "weight_decay": weight_decay,
                        "num_prefixes": num_prefixes, "prefix_length": prefix_length, "kl_suffix": kl_suffix,
                        "early_stop_nll": early_stop_nll, "seed": seed, "key_token": key_token,
                        "module_groups": module_groups, "steps_per_group": steps_per_group}
        for name in self.module_shapes:
            _block_of(name)  # a module outside a block is a ConfigError now, not at the first edit
        self.commits = 0  # steps committed in this sequence: which module group edits next
        self.key_memory = KeyMemory(edit_memory) if edit_memory > 0 else None
        self.second_moments: dict[str, torch.Tensor] = {}
        self.prefixes: list[list[int]] = []
        self.kl_suffix_ids: list[int] = []
        self.bos: int | None = None
        self.statistics_info: dict[str, Any] = {}

    def setup(self, context: EditContext) -> None:
        if context.statistics is None:
            raise ConfigError(f"{type(self).__name__} needs preserved-knowledge statistics: configure `stats` "
                              "(for example stats/source=wikitext)")
        missing = sorted(set(self.module_shapes) - set(context.modules))
        if missing:
            raise ConfigError(f"{type(self).__name__} was built for modules {missing} that are not edited")
        modules = {name: context.modules[name] for name in self.module_shapes}
        self.second_moments = context.statistics.second_moments(context.model, context.tokenizer, modules)
        bad = [name for name, C in self.second_moments.items() if not bool(torch.isfinite(C).all())]
        if bad:
            raise ConfigError(f"the preserved-knowledge statistics of {', '.join(bad)} are not finite "
                              f"(cache {context.statistics.describe().get('cache')}): delete them to recompute")
        self.statistics_info = context.statistics.describe()
        tokenizer = context.tokenizer
        first = tokenizer("x")["input_ids"][:1]
        self.bos = first[0] if first and first[0] == tokenizer.bos_token_id else None
        self.kl_suffix_ids = tokenizer(self.options["kl_suffix"], add_special_tokens=False)["input_ids"]
        self.prefixes = _sample_prefixes(context.model, tokenizer, self.options["num_prefixes"],
                                         self.options["prefix_length"], self.options["seed"])
        self.prepare()

    def prepare(self) -> None:
        """Derive what `solve` needs from the second moments (once per run)."""

    @property
    def active_modules(self) -> list[str]:
        """The modules the next step edits, in model order: all of them, or the current group's."""
        names = list(self.module_shapes)
        size = len(names) // self.options["module_groups"]
        group = (self.commits // self.options["steps_per_group"]) % self.options["module_groups"]
        return names[group * size:(group + 1) * size]

    @property
    def z_block(self) -> str:
        """The block after whose output z is written: the one holding the last module edited next."""
        return _block_of(self.active_modules[-1])

    def report(self) -> dict[str, Any]:
        return {"statistics": self.statistics_info}

    @abstractmethod
    def solve(self, name: str, keys: torch.Tensor, residuals: torch.Tensor) -> ModuleUpdate:
        """The update of module `name` that moves its outputs at `keys` (N x d_in) by `residuals` (N x d_out)."""

    def preserved(self, name: str) -> torch.Tensor:
        """mom2_weight x C + the Gram of earlier edits' keys, in fp64 (C's small eigenvalues are what the solves
        protect, and fp32 rounding of the sum would swamp them): what an update of `name` must keep."""
        A = self.options["mom2_weight"] * self.second_moments[name].double()
        memory = None if self.key_memory is None else self.key_memory.gram.get(name)
        return A if memory is None else A + memory.double()

    def predict_update(self, model: nn.Module, modules: Mapping[str, nn.Module], batch: TokenizedBatch) -> FactoredUpdate:
        if not self.second_moments:
            raise ConfigError(f"{type(self).__name__}.setup(context) must run before the first edit")
        self.check_subjects(batch)
        if self.key_memory is not None:
            self.key_memory.discard_pending()
        n = batch.num_rows
        rows = self._prompt_rows(batch)
        kl_rows = self._kl_rows(batch)
        z = self._target_values(model, rows, kl_rows, n)
        update: FactoredUpdate = {}
        names = self.active_modules
        passes = _BlockPasses(model, self.z_block, rows, min(_block_index(name) for name in names))
        for i, name in enumerate(names):
            # the inputs of blocks up to the one just updated are unchanged: resume from there
            start = None if i == 0 else min(_block_index(names[i - 1]), _block_index(name))
            with functional_update(modules, update):
                keys, current = self._keys_and_outputs(passes, modules[name], start, n)
            residuals = (z - current) / (len(names) - i)
            refuse_non_finite(f"{type(self).__name__} refused module '{name}'",
                              {"keys": keys, "residuals": residuals})
            update[name] = self.solve(name, keys, residuals)
            if self.key_memory is not None:
                self.key_memory.propose(name, keys)
        return update

    def committed(self) -> None:
        self.commits += 1
        if self.key_memory is not None:
            self.key_memory.commit()

    def reverted(self, k: int | None = None) -> None:
        self.commits = 0 if k is None else max(self.commits - k, 0)
        if self.key_memory is not None:
            self.key_memory.revert(k)

    def sequence_state(self) -> dict[str, Any]:
        return {**super().sequence_state(), "commits": self.commits, "key_memory": self.key_memory}

    def load_sequence_state(self, state: dict[str, Any]) -> None:
        super().load_sequence_state(state)
        self.commits, self.key_memory = state["commits"], state["key_memory"]

    def snapshot(self) -> Any:
        return None  # the state changes only on commit (the key memory's pending keys are dropped below)

    def restore(self, snapshot: Any) -> None:
        if self.key_memory is not None:
            self.key_memory.discard_pending()

    # --- the rows the optimisation and the keys are computed on --------------------------------------

    def _prompt_rows(self, batch: TokenizedBatch) -> TokenizedBatch:
        """Each request's prompt + new target, bare and behind each prefix: request i owns rows
        i * (1 + num_prefixes) ... ; its first row is the bare prompt."""
        ids, labels, requests, lasts = [], [], [], []
        # the prompt's last token is the first that predicts a target token
        located = batch.subject_last if self.options["key_token"] == "subject" else batch.target_mask.int().argmax(-1)
        for row in range(batch.num_rows):
            length = int(batch.attention_mask[row].sum())
            row_ids, row_labels = batch.input_ids[row, :length].tolist(), batch.labels[row, :length].tolist()
            cut = 1 if self.bos is not None and row_ids[0] == self.bos else 0
            for prefix in [[], *self.prefixes]:
                ids.append(row_ids[:cut] + prefix + row_ids[cut:])
                labels.append(row_labels[:cut] + [IGNORE_INDEX] * len(prefix) + row_labels[cut:])
                requests.append(row)
                lasts.append(int(located[row]) + len(prefix))
        return _padded(ids, labels, requests, lasts, batch.input_ids.device)

    def _kl_rows(self, batch: TokenizedBatch) -> TokenizedBatch:
        """"<subject> is a" for each request, from the prompt's own subject tokens (KL at its last token; delta is
        written at the subject's last token, or with key_token=prompt at that last token)."""
        ids, labels, lasts = [], [], []
        for row in range(batch.num_rows):
            first, last = int(batch.subject_first[row]), int(batch.subject_last[row])
            subject = batch.input_ids[row, first:last + 1].tolist()
            head = [self.bos] if self.bos is not None else []
            ids.append(head + subject + self.kl_suffix_ids)
            labels.append([IGNORE_INDEX] * len(ids[-1]))
            lasts.append(len(head) + len(subject) - 1 if self.options["key_token"] == "subject" else len(ids[-1]) - 1)
        return _padded(ids, labels, list(range(batch.num_rows)), lasts, batch.input_ids.device)

    # --- step 1: target values -------------------------------------------------------------------------

    def _target_values(self, model: nn.Module, rows: TokenizedBatch, kl_rows: TokenizedBatch, n: int) -> torch.Tensor:
        """z = h + delta for every request; a request stops (its rows leave the batch, its delta is frozen) once
        its target NLL is below `early_stop_nll`, as it would optimised alone."""
        o = self.options
        both = TokenizedBatch.concat([rows, kl_rows])
        is_kl = torch.arange(both.num_rows, device=both.input_ids.device) >= rows.num_rows
        scored = both.target_mask.clone()
        scored[is_kl.nonzero().flatten(), both.attention_mask[is_kl].sum(-1) - 1] = True  # KL: after the last token
        suffixes = _SuffixPass(model, self.z_block, both, scored)
        bare = torch.arange(0, rows.num_rows, 1 + len(self.prefixes), device=both.input_ids.device)
        h = suffixes.subject_output[bare]
        kl_reference = suffixes.logits[suffixes.token_row(is_kl)].float().log_softmax(-1)
        h_norm = h.norm(dim=-1)
        delta = torch.zeros_like(h, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=o["z_lr"])
        active = torch.ones(n, dtype=torch.bool, device=h.device)
        targets = both.labels[:, 1:][both.target_mask[:, :-1]]
        target_rows = both.target_mask.nonzero()[:, 0]
        with torch.enable_grad():
            for _ in range(o["z_steps"]):
                keep = active[both.request_index]
                logits = suffixes.run(delta, keep)
                prompt = (keep & ~is_kl)[target_rows]
                nll = _request_nll(logits[suffixes.token_row(keep & ~is_kl, within=keep)], targets[prompt],
                                   target_rows[prompt], both, n, 1 + len(self.prefixes))
                kl_rows_now = keep & is_kl
                kl_logp = logits[suffixes.token_row(kl_rows_now, within=keep)].float().log_softmax(-1)
                reference = kl_reference[suffixes.token_row(kl_rows_now, within=is_kl)]
                kl = (reference.exp() * (reference - kl_logp)).sum(-1)
                decay = (delta.norm(dim=-1) / h_norm) ** 2
                active &= nll.detach() >= o["early_stop_nll"]
                if not bool(active.any()):
                    break
                kl_requests = both.request_index[kl_rows_now]
                loss = (nll + o["weight_decay"] * decay)[active].sum() + o["kl_factor"] * kl[active[kl_requests]].sum()
                frozen = delta.detach()[~active].clone()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    delta[~active] = frozen
                    delta.mul_(row_clamp_factors(delta, o["clamp_norm"] * h_norm))
        return h + delta.detach()

    # --- step 2: keys and current outputs ----------------------------------------------------------------

    def _keys_and_outputs(self, passes: _BlockPasses, module: nn.Module, start: int | None,
                          n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of `module` at the subject, averaged over each request's rows, and the block's output at the
        subject of each bare prompt, on the model as it is inside the caller's functional update (a pass
        resumed at block `start`, or a whole one)."""
        rows = passes.rows
        keys, output = passes.run(module, start)
        bare = torch.arange(0, rows.num_rows, 1 + len(self.prefixes), device=rows.input_ids.device)
        keys = torch.zeros(n, keys.shape[-1], device=keys.device).index_add(
            0, rows.request_index, keys) / float(1 + len(self.prefixes))
        return keys, output[bare]


def _block_index(module_name: str) -> int:
    """The index of a module's block in its model's list of blocks: `model.layers.7.mlp.down_proj` -> 7."""
    return int(_block_of(module_name).rsplit(".", 1)[1])


def _block_list(model: nn.Module, block_name: str) -> tuple[nn.ModuleList, int]:
    """The model's list of blocks and the index of `block_name` in it: `model.layers.7` -> (model.layers, 7)."""
    layers_name, index = block_name.rsplit(".", 1)
    return model.get_submodule(layers_name), int(index)


def _block_of(module_name: str) -> str:
    """The transformer block a module belongs to: `model.layers.7.mlp.down_proj` -> `model.layers.7`."""
    parts = module_name.split(".")
    if len(parts) < 3:
        raise ConfigError(f"locate-then-edit editors edit a block's MLP projection (like "
                          f"model.layers.7.mlp.down_proj); {module_name!r} is not inside a block")
    return ".".join(parts[:-2])


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Read(Exception):
    """Raised after the block's output was read, when the layers above it are not needed."""


@contextmanager
def _reading(block: nn.Module, rows: torch.Tensor, positions: torch.Tensor, stop: bool = False):
    """Collects the block's output at (rows, positions) of the next forward pass, then the rest of its output
    tuple (None if it returns a tensor), and ends that pass there, raising _Read, when `stop`."""
    read: list[Any] = []

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        read.extend([_hidden(output)[rows, positions].detach(),
                     tuple(output[1:]) if isinstance(output, tuple) else None])
        if stop:
            raise _Read

    handle = block.register_forward_hook(hook)
    try:
        yield read
    finally:
        handle.remove()


def _padded(ids: list[list[int]], labels: list[list[int]], requests: list[int], lasts: list[int],
            device: torch.device) -> TokenizedBatch:
    input_ids, attention_mask = pad_right(ids, 0)
    label_ids, _ = pad_right(labels, IGNORE_INDEX)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    target_mask[:, :-1] = label_ids[:, 1:] != IGNORE_INDEX
    located = torch.tensor(lasts)
    return TokenizedBatch(input_ids, attention_mask, label_ids, target_mask, torch.tensor(requests),
                          None, located).to(device)


class _BlockPasses:
    """Forward passes of `rows` up to the block z is read from, resumable at any block below it: the first
    runs the model and records the input and call arguments (masks, position embeddings) of each block from
    `first_block` on; after an update of a module in block j, a pass runs blocks j..z only."""

    def __init__(self, model: nn.Module, block_name: str, rows: TokenizedBatch, first_block: int):
        self.model, self.rows, self.first_block = model, rows, first_block
        self.layers, self.block_index = _block_list(model, block_name)
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.positions = (torch.arange(rows.num_rows, device=rows.input_ids.device), rows.subject_last)

    def run(self, module: nn.Module, start: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(`module`'s input, the block's output) at every row's subject, from block `start` on, or from the
        embeddings if None (the first pass)."""
        captured: list[torch.Tensor] = []
        handles = [module.register_forward_pre_hook(lambda _m, args: captured.append(args[0][self.positions]))]
        with torch.no_grad():
            try:
                if start is None:
                    hidden = self._whole_pass(handles)
                else:
                    hidden = self.calls[start][0][0]
                    for j in range(start, self.block_index + 1):
                        args, kwargs = self.calls[j]
                        self.calls[j] = ((hidden, *args[1:]), kwargs)
                        hidden = _hidden(self.layers[j](hidden, *args[1:], **kwargs))
            finally:
                for handle in handles:
                    handle.remove()
        return captured[0].float(), hidden[self.positions].float()

    def _whole_pass(self, handles: list) -> torch.Tensor:
        def record(j: int):
            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                kwargs = dict(kwargs)
                self.calls[j] = (args or (kwargs.pop("hidden_states"),), kwargs)
            return hook

        handles += [self.layers[j].register_forward_pre_hook(record(j), with_kwargs=True)
                    for j in range(self.first_block, self.block_index + 1)]
        with _reading(self.layers[self.block_index], slice(None), slice(None), stop=True) as read:
            try:
                self.model.base_model(input_ids=self.rows.input_ids, attention_mask=self.rows.attention_mask,
                                      use_cache=False)
            except _Read:  # the blocks above are not needed
                pass
        return read[0]


class _SuffixPass:
    """Rows split at the subject's last token, where delta is written: nothing before it depends on delta, so
    the keys and values of that part are computed once, and so is the output of every block up to the one
    delta is added to. Each optimisation step then runs only the tokens from the subject's last one on, and
    only through the blocks above (`_replaying`), in groups of rows of one length (no padding).

    `scored` (B x T bool, row coordinates) marks the positions whose logits `run` returns, row-major;
    `subject_output` (B x d) and `logits` are the block's output at each subject and those logits, unedited.
    """

    def __init__(self, model: nn.Module, block_name: str, rows: TokenizedBatch, scored: torch.Tensor):
        self.model, device = model, rows.input_ids.device
        self.layers, self.block_index = _block_list(model, block_name)
        split = rows.subject_last.cpu()
        first = torch.where(scored.cpu().any(-1), scored.cpu().float().argmax(-1), split)
        if bool((first < split).any()):
            raise DataError("locate-then-edit rows must score only positions from the subject's last token on")
        ids = rows.input_ids.tolist()
        # each row runs up to its last scored position (a target's last token predicts nothing needed)
        ends = torch.where(scored.cpu().any(-1), scored.cpu().long().cumsum(-1).argmax(-1), split) + 1
        # a row whose subject's last token comes first has nothing before it: one placeholder token, masked below
        before_ids, before_mask = pad_right([row[:max(s, 1)] for row, s in zip(ids, split.tolist())], 0)
        after_ids, after_mask = pad_right([row[s:e] for row, s, e in zip(ids, split.tolist(), ends.tolist())], 0)
        # transformers 5 renamed past_key_values to cache (in and out)
        self.cache_keyword = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters \
            else "past_key_values"
        with torch.no_grad():
            cache = model.base_model(input_ids=before_ids.to(device), attention_mask=before_mask.to(device),
                                     position_ids=torch.arange(before_ids.shape[1]).expand_as(before_ids)
                                     .to(device), use_cache=True)[self.cache_keyword]
        before_mask[split == 0, 0] = 0
        self.input_ids = after_ids.to(device)
        self.attention_mask = torch.cat([before_mask, after_mask], -1).to(device)
        self.position_ids = (split[:, None] + torch.arange(after_ids.shape[1])).to(device)
        shift = torch.arange(after_ids.shape[1])[None, :] + split[:, None]
        self.scored = (scored.cpu().gather(-1, shift.clamp(max=scored.shape[1] - 1)) & after_mask.bool()).to(device)
        # each scored position's rank in the row-major order, to put the groups' logits back in that order
        self.rank = torch.full(self.scored.shape, -1, dtype=torch.long, device=device)
        self.rank[self.scored] = torch.arange(int(self.scored.sum()), device=device)
        self.request_index = rows.request_index
        self._token_rows = self.scored.nonzero()[:, 0]
        self.before_length = before_ids.shape[1]
        lengths = after_mask.sum(-1).to(device)
        self.groups = []
        for length in lengths.unique().tolist():
            members = (lengths == length).nonzero().flatten()
            group_cache = copy.deepcopy(cache)
            group_cache.batch_select_indices(members)
            self.groups.append((members, length, group_cache))
        with torch.no_grad(), _reading(self.layers[self.block_index], slice(None), slice(None)) as read:
            hidden = model.base_model(input_ids=self.input_ids, attention_mask=self.attention_mask,
                                      position_ids=self.position_ids, use_cache=True,
                                      **{self.cache_keyword: cache}).last_hidden_state
        self.block_output, self.output_rest = read[0], read[1]
        self.subject_output = self.block_output[:, 0].float()
        self.logits = output_logits(model, hidden[self.scored])

    def run(self, delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Logits at the scored positions of the rows in `keep`, row-major, with delta[request] added to the
        block's output at each kept row's subject."""
        hidden, ranks = [], []
        for members, length, group_cache in self.groups:
            rows = members[keep[members]]
            if len(rows) == 0:
                continue
            cache = copy.deepcopy(group_cache)
            if len(rows) < len(members):
                cache.batch_select_indices(keep[members].nonzero().flatten())
            written = self.block_output[rows, :length].index_add(
                1, torch.zeros(1, dtype=torch.long, device=rows.device),
                delta[self.request_index[rows]].to(self.block_output.dtype)[:, None])
            with _replaying(self.layers, self.block_index, written, self.output_rest):
                out = self.model.base_model(input_ids=self.input_ids[rows, :length],
                                            attention_mask=self.attention_mask[rows, :self.before_length + length],
                                            position_ids=self.position_ids[rows, :length], use_cache=True,
                                            **{self.cache_keyword: cache}).last_hidden_state
            scored = self.scored[rows, :length]
            hidden.append(out[scored])
            ranks.append(self.rank[rows, :length][scored])
        order = torch.cat(ranks).argsort()
        return output_logits(self.model, torch.cat(hidden)[order])

    def token_row(self, rows: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor:
        """Indices, among the scored tokens of the rows in `within` (default: all rows), of the tokens of `rows`."""
        token_rows = self._token_rows if within is None else self._token_rows[within[self._token_rows]]
        return rows[token_rows].nonzero().flatten()


class _StandIn(nn.Module):
    """Takes a block's place in `_replaying`: returns `output` (or, without one, its input) in the block's own
    output format, with the block's plain attributes (a decoder loop may read `attention_type` and the like)."""

    def __init__(self, block: nn.Module, output: torch.Tensor | None, rest: tuple | None):
        super().__init__()
        for key, value in vars(block).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self.output, self.rest = output, rest

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        hidden = hidden_states if self.output is None else self.output
        return hidden if self.rest is None else (hidden, *self.rest)


@contextmanager
def _replaying(layers: nn.ModuleList, index: int, output: torch.Tensor, rest: tuple | None):
    """The next forward pass skips blocks 0..index: block `index` gives `output` (its cached output, with
    delta written), the blocks below pass their input on; they are put back afterwards."""
    originals = [layers[i] for i in range(index + 1)]
    try:
        for i, block in enumerate(originals):
            layers[i] = _StandIn(block, output if i == index else None, rest)
        yield
    finally:
        for i, block in enumerate(originals):
            layers[i] = block


def _request_nll(logits: torch.Tensor, targets: torch.Tensor, token_rows: torch.Tensor, batch: TokenizedBatch,
                 n: int, rows_per_request: int) -> torch.Tensor:
    """(n,) each request's mean over its rows of the mean target-token NLL, from the logits of the target
    tokens of some of `batch`'s rows (`token_rows`: the row of each); 0 for requests without rows here."""
    nll = F.cross_entropy(logits.float(), targets, reduction="none")
    per_row = torch.zeros(batch.num_rows, device=nll.device).index_add(0, token_rows, nll) \
        / batch.target_mask.sum(-1).clamp(min=1).float()
    rows = token_rows.unique()
    return torch.zeros(n, device=nll.device).index_add(0, batch.request_index[rows], per_row[rows]) / rows_per_request


def _sample_prefixes(model: nn.Module, tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` texts of `length` tokens the model writes from its first token (seeded, top-5 as ROME), as ids."""
    if count == 0:
        return []
    specials = set(tokenizer.all_special_ids)
    rows = torch.cat(list(sampled_token_rows(model, tokenizer, count, length, seed, top_k=5, batch_size=count)))
    return [[t for t in row.tolist() if t not in specials] for row in rows]
