"""The locate-then-edit family: closed forms against dense references, batched target values against one
request at a time, exact revert, refusals, and the subject they need."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from rledit.data.collate import EditCollator, TokenizedBatch
from rledit.data.records import EditRecord
from rledit.data.text import SampledText
from rledit.editing.functional import functional_update
from rledit.editing.losses import logits_at
from rledit.editors.alphaedit import AlphaEditEditor
from rledit.editors.base import EditContext
from rledit.editors.emmet import EmmetEditor
from rledit.editors.locate import _BlockPasses, _hidden, _reading, _SuffixPass
from rledit.editors.memit import MemitEditor
from rledit.editors.rome import RomeEditor
from rledit.errors import ConfigError, DataError, EditRefusedError
from rledit.models.layers import resolve_edit_modules
from rledit.models.statistics import PreservedStatistics
from rledit.pipeline import require_subjects
from rledit.session import EditSession
from rledit.threads import cpu_threads

# The small world's model has moved the subject into the last position by layer 1's output: layer 0 is
# where its facts can be edited at the subject (configs/model/tiny.yaml, locate_modules).
ONE_LAYER = "model.layers.0.mlp.down_proj"
TWO_LAYERS = "model.layers.{0-1}.mlp.down_proj"
D_IN, D_OUT, N = 24, 10, 5
M = "h.0.mlp.proj"  # a module inside a block, as locate-then-edit editors need


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with cpu_threads(1):
        yield


def random_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    residuals = torch.randn(N, D_OUT, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))[0]
    C = basis @ torch.diag(torch.logspace(0, -5, D_IN, dtype=torch.float64)) @ basis.T
    return keys.float(), residuals.float(), C.float()


def bare_editor(cls, C: torch.Tensor, **options):
    editor = cls({M: (D_OUT, D_IN)}, **options)
    editor.second_moments = {M: C}
    editor.prepare()
    return editor


def test_memit_solve_is_the_dense_ridge_against_the_prior():
    keys, residuals, C = random_problem()
    editor = bare_editor(MemitEditor, C, mom2_weight=3.0)
    dense = residuals.T.double() @ keys.double() @ torch.linalg.inv(3.0 * C.double() + keys.T.double() @ keys.double())
    assert torch.allclose(editor.solve(M, keys, residuals).dense().double(), dense, atol=1e-4)


def test_emmet_meets_every_edit_exactly_and_is_the_dense_closed_form():
    keys, residuals, C = random_problem(1)
    editor = bare_editor(EmmetEditor, C, mom2_weight=2.0, ridge=0.0)
    dW = editor.solve(M, keys, residuals).dense().double()
    assert torch.allclose(dW @ keys.T.double(), residuals.T.double(), atol=1e-4)
    A_inv = torch.linalg.inv(2.0 * C.double())
    K = keys.double()
    dense = residuals.T.double() @ torch.linalg.inv(K @ A_inv @ K.T) @ K @ A_inv
    assert torch.allclose(dW, dense, atol=1e-4)


def test_rome_equals_its_rank_one_updates_made_one_request_after_another():
    keys, residuals, C = random_problem(2)
    editor = bare_editor(RomeEditor, C)
    A_inv = torch.linalg.inv(C.double() * editor.options["mom2_weight"])
    total = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    for k, r in zip(keys.double(), residuals.double(), strict=True):
        left = r - total @ k  # what the earlier requests' updates already moved
        u = A_inv @ k
        total += torch.outer(left, u) / (u @ k)
    assert torch.allclose(editor.solve(M, keys, residuals).dense().double(), total, atol=1e-4)
    assert torch.allclose(total @ keys[-1].double(), residuals[-1].double(), atol=1e-5)  # the last one holds exactly


def test_alphaedit_leaves_the_preserved_directions_alone_and_is_the_dense_formula():
    keys, residuals, C = random_problem(3)
    editor = bare_editor(AlphaEditEditor, C, nullspace_threshold=1e-3, ridge=0.5)
    values, vectors = torch.linalg.eigh(C.double())
    preserved = vectors[:, values >= 1e-3 * values.max()]
    assert editor.ranks[M] == D_IN - preserved.shape[1] > 0
    dW = editor.solve(M, keys, residuals).dense().double()
    assert float((dW @ preserved).abs().max()) < 1e-5 * float(dW.abs().max())
    P = editor.projectors[M].double()
    ridge = 0.5 * C.double().diagonal().mean()
    K = keys.double()
    dense = residuals.T.double() @ K @ P @ torch.linalg.inv(K.T @ K @ P + ridge * torch.eye(D_IN, dtype=torch.float64))
    assert torch.allclose(dW, dense, atol=1e-4)


def test_alphaedit_refuses_an_empty_null_space_naming_the_module():
    _, _, C = random_problem(4)
    with pytest.raises(ConfigError, match="null space of module 'h.0.mlp.proj' is empty"):
        bare_editor(AlphaEditEditor, C, nullspace_threshold=1e-9, threshold_kind="absolute")
    with pytest.raises(ConfigError, match="threshold_kind"):
        AlphaEditEditor({M: (D_OUT, D_IN)}, threshold_kind="entropy")


def test_rome_edits_exactly_one_module():
    with pytest.raises(ConfigError, match="ROME edits exactly one module"):
        RomeEditor({"h.0.mlp.a": (2, 3), "h.0.mlp.b": (2, 3)})


@pytest.fixture(scope="module")
def statistics(tmp_path_factory):
    return PreservedStatistics(SampledText(num_texts=96, length=24), num_tokens=2000,
                               cache_dir=str(tmp_path_factory.mktemp("statistics")), progress=False)


def set_up(cls, world_model, statistics, spec=ONE_LAYER, **options):
    model, tokenizer = world_model.model, world_model.tokenizer
    editable = resolve_edit_modules(model, spec)
    editor = cls({name: (em.d_out, em.d_in) for name, em in editable.items()}, **options)
    editor.setup(EditContext(model, tokenizer, {name: em.module for name, em in editable.items()}, statistics))
    return editor, editable


def edit_batch(world_model, requests):
    return EditCollator(world_model.tokenizer)(requests).edit


def test_target_values_are_optimised_for_all_requests_at_once_as_if_one_at_a_time(
        small_world_model, small_edit_requests, statistics):
    editor, _ = set_up(MemitEditor, small_world_model, statistics, z_steps=8, early_stop_nll=2.0)
    model = small_world_model.model
    requests = small_edit_requests[:3]

    def values(batch):
        return editor._target_values(model, editor._prompt_rows(batch), editor._kl_rows(batch),
                                     batch.num_rows)

    together = values(edit_batch(small_world_model, requests))
    alone = torch.cat([values(edit_batch(small_world_model, [r])) for r in requests])
    assert torch.allclose(together, alone, atol=1e-4)


@contextmanager
def _writing(block, delta, requests, positions):
    """The reference: adds delta[request of row] to the block's output at each row's subject position."""
    rows = torch.arange(len(requests))

    def hook(module, args, output):
        hidden = _hidden(output)
        shifted = hidden.index_put((rows, positions), delta[requests].to(hidden.dtype), accumulate=True)
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("spec", [ONE_LAYER, TWO_LAYERS])
def test_suffix_pass_gives_the_logits_of_whole_rows(small_world_model, small_edit_requests, statistics, spec):
    """Running only the tokens from the subject's last one on, on the cached rest and only through the blocks
    above the one delta is written to, gives the logits a whole forward pass gives with the same delta
    written at the subject; for any subset of the rows, and for a row whose subject's last token comes first.
    The model's blocks are back in place afterwards."""
    editor, _ = set_up(MemitEditor, small_world_model, statistics, spec, num_prefixes=2)
    model = small_world_model.model
    blocks = list(model.model.layers)
    block = model.get_submodule(editor.z_block)
    batch = edit_batch(small_world_model, small_edit_requests[:4])
    rows = TokenizedBatch.concat([editor._prompt_rows(batch), editor._kl_rows(batch)])
    first = rows.subject_last.clone()
    first[0] = 0
    rows = TokenizedBatch(**{**vars(rows), "subject_last": first})
    scored = rows.target_mask.clone()
    scored[torch.arange(rows.num_rows), rows.attention_mask.sum(-1) - 1] = True
    delta = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    suffixes = _SuffixPass(model, editor.z_block, rows, scored)
    with torch.no_grad(), _reading(block, torch.arange(rows.num_rows), rows.subject_last) as read:
        unedited = logits_at(model, rows.input_ids, rows.attention_mask, scored)
    torch.testing.assert_close(suffixes.logits, unedited, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(suffixes.subject_output, read[0], rtol=1e-5, atol=1e-5)
    for keep in (torch.ones(rows.num_rows, dtype=torch.bool), torch.arange(rows.num_rows) % 3 != 1):
        with torch.no_grad(), _writing(block, delta, rows.request_index[keep], rows.subject_last[keep]):
            whole = logits_at(model, rows.input_ids[keep], rows.attention_mask[keep], scored[keep])
        with torch.no_grad():
            part = suffixes.run(delta, keep)
        torch.testing.assert_close(part, whole, rtol=1e-4, atol=1e-4)
    assert list(model.model.layers) == blocks


@pytest.mark.parametrize("key_token", ["subject", "prompt"])
def test_target_values_make_the_new_targets_likelier(small_world_model, small_edit_requests, statistics, key_token):
    editor, _ = set_up(MemitEditor, small_world_model, statistics, num_prefixes=0, key_token=key_token)
    model = small_world_model.model
    batch = edit_batch(small_world_model, small_edit_requests[:8])
    rows = editor._prompt_rows(batch)
    block = model.get_submodule(editor.z_block)
    z = editor._target_values(model, rows, editor._kl_rows(batch), batch.num_rows)
    with torch.no_grad(), _reading(block, torch.arange(8), rows.subject_last) as read:
        model.base_model(input_ids=rows.input_ids, attention_mask=rows.attention_mask)
    targets = rows.labels[:, 1:][rows.target_mask[:, :-1]]

    def nll(delta):
        with torch.no_grad(), _writing(block, delta, rows.request_index, rows.subject_last):
            return F.cross_entropy(logits_at(model, rows.input_ids, rows.attention_mask, rows.target_mask), targets)

    assert nll(z - read[0]) < 0.8 * nll(torch.zeros_like(z))


@pytest.mark.parametrize("key_token", ["subject", "prompt"])
def test_the_last_module_writes_the_target_value_exactly_when_the_prior_is_weak(
        small_world_model, small_edit_requests, statistics, key_token):
    """With no prefixes (keys = the bare prompt's) and a tiny prior, MEMIT's last layer maps each key to its
    residual, so the block's output at the key token (the subject's last, or the prompt's last) becomes z."""
    editor, editable = set_up(MemitEditor, small_world_model, statistics, num_prefixes=0, mom2_weight=1e-6,
                              key_token=key_token)
    model = small_world_model.model
    modules = {name: em.module for name, em in editable.items()}
    batch = edit_batch(small_world_model, small_edit_requests[:6])
    rows = editor._prompt_rows(batch)
    expected = batch.subject_last if key_token == "subject" else batch.target_mask.int().argmax(-1)
    assert torch.equal(rows.subject_last, expected)
    if key_token == "prompt":  # the last prompt token predicts the first target token
        assert bool((batch.labels[torch.arange(6), expected + 1] >= 0).all())
        assert bool((batch.labels[torch.arange(6), expected] < 0).all())
    z = editor._target_values(model, rows, editor._kl_rows(batch), 6)
    update = editor.predict_update(model, modules, batch)
    with functional_update(modules, update):
        _, after = editor._keys_and_outputs(_BlockPasses(model, editor.z_block, rows, 0), modules[ONE_LAYER], None, 6)
    _, before = editor._keys_and_outputs(_BlockPasses(model, editor.z_block, rows, 0), modules[ONE_LAYER], None, 6)
    assert float((after - z).norm()) < 1e-3 * float((before - z).norm())


def test_a_pass_resumed_after_an_update_reads_what_a_whole_pass_reads(small_world_model, small_edit_requests,
                                                                     statistics):
    """After layer 0's update, the keys of layer 1 and the block output read by a pass resumed at block 0 (from
    the inputs the first pass recorded) are those of a whole forward pass of the updated model."""
    editor, editable = set_up(MemitEditor, small_world_model, statistics, TWO_LAYERS, z_steps=3)
    model = small_world_model.model
    modules = {name: em.module for name, em in editable.items()}
    names = list(modules)
    batch = edit_batch(small_world_model, small_edit_requests[:5])
    rows = editor._prompt_rows(batch)
    passes = _BlockPasses(model, editor.z_block, rows, 0)
    _, unedited = passes.run(modules[names[0]], None)
    update = {names[0]: editor.predict_update(model, modules, batch)[names[0]]}
    with functional_update(modules, update):
        resumed = passes.run(modules[names[1]], 0)
        whole = _BlockPasses(model, editor.z_block, rows, 0).run(modules[names[1]], None)
    for a, b in zip(resumed, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert float((resumed[1] - unedited).norm()) > 1e-3 * float(unedited.norm())  # the update changed them


@pytest.mark.parametrize("cls", [MemitEditor, AlphaEditEditor, EmmetEditor])
def test_edits_revert_bit_exactly_and_the_key_memory_follows(cls, small_world_model, small_edit_requests,
                                                            statistics):
    editor, editable = set_up(cls, small_world_model, statistics, TWO_LAYERS, z_steps=3, edit_memory=1.0)
    model = small_world_model.model
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    session = EditSession(model, editable, editor)
    session.edit(edit_batch(small_world_model, small_edit_requests[:4]))
    first_gram = {k: v.clone() for k, v in editor.key_memory.gram.items()}
    session.edit(edit_batch(small_world_model, small_edit_requests[4:8]))
    assert any(not torch.equal(p, original[n]) for n, p in model.named_parameters())
    session.revert(1)
    assert all(torch.equal(editor.key_memory.gram[k], v) for k, v in first_gram.items())
    session.revert()
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    assert editor.key_memory.gram == {}


def test_module_groups_take_the_steps_in_turn_and_each_edits_as_an_editor_of_that_group_alone(
        small_world_model, small_edit_requests, statistics):
    """Two groups of one layer, one step each: the first step is exactly what an AlphaEdit of layer 0 alone
    predicts, the second touches layer 1 only (z written after block 1), the third layer 0 again; a revert
    gives the reverted step's group the next edit."""
    grouped, editable = set_up(AlphaEditEditor, small_world_model, statistics, TWO_LAYERS, z_steps=3,
                               module_groups=2, steps_per_group=1)
    alone, _ = set_up(AlphaEditEditor, small_world_model, statistics, ONE_LAYER, z_steps=3)
    model = small_world_model.model
    batches = [edit_batch(small_world_model, small_edit_requests[i:i + 3]) for i in (0, 3, 6)]
    first = alone.predict_update(model, {ONE_LAYER: editable[ONE_LAYER].module}, batches[0])
    session = EditSession(model, editable, grouped)
    updates = [session.edit(batch) for batch in batches[:2]]
    assert list(updates[0]) == [ONE_LAYER] and list(updates[1]) == ["model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(updates[0][ONE_LAYER].dense(), first[ONE_LAYER].dense(), rtol=0, atol=0)
    assert list(grouped.key_memory.gram) == [ONE_LAYER, "model.layers.1.mlp.down_proj"]
    session.revert(1)
    assert list(session.edit(batches[1])) == ["model.layers.1.mlp.down_proj"]
    assert list(session.edit(batches[2])) == [ONE_LAYER]
    session.revert()
    assert grouped.active_modules == [ONE_LAYER]


def test_module_groups_that_do_not_divide_the_modules_are_a_clear_error():
    shapes = {f"h.{i}.mlp.proj": (D_OUT, D_IN) for i in range(3)}
    with pytest.raises(ConfigError, match=r"module_groups \(2\) must divide the 3 edited modules"):
        MemitEditor(shapes, module_groups=2)
    with pytest.raises(ConfigError, match="steps_per_group"):
        MemitEditor(shapes, module_groups=3, steps_per_group=0)


def test_non_finite_statistics_refuse_the_edit_and_leave_the_model_as_it_was(
        small_world_model, small_edit_requests, statistics):
    editor, editable = set_up(MemitEditor, small_world_model, statistics, z_steps=2)
    editor.second_moments[ONE_LAYER] = editor.second_moments[ONE_LAYER].clone().fill_(float("nan"))
    model = small_world_model.model
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    session = EditSession(model, editable, editor)
    with pytest.raises(EditRefusedError):
        session.edit(edit_batch(small_world_model, small_edit_requests[:3]))
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    assert editor.key_memory is None or editor.key_memory.steps == []


def test_requests_without_their_subject_are_refused_before_and_during_editing(
        small_world_model, small_edit_requests, statistics):
    editor, editable = set_up(MemitEditor, small_world_model, statistics, z_steps=1)
    good = small_edit_requests[0]
    bad = EditRecord("no-subject", good.prompt, good.target_new, good.target_true, subject="Nobody")
    with pytest.raises(DataError, match="record 1, field 'subject'.*'Nobody' of record 'no-subject'"):
        require_subjects([good, bad], editor)
    with pytest.raises(DataError, match=r"edit row\(s\) 1 .*subject"):
        editor.predict_update(small_world_model.model, {n: em.module for n, em in editable.items()},
                              edit_batch(small_world_model, [good, bad]))


def test_an_unknown_key_token_is_a_clear_error():
    with pytest.raises(ConfigError, match="key_token"):
        MemitEditor({M: (D_OUT, D_IN)}, key_token="object")


def test_editing_before_setup_is_a_clear_error(small_world_model, small_edit_requests):
    editable = resolve_edit_modules(small_world_model.model, ONE_LAYER)
    editor = MemitEditor({n: (em.d_out, em.d_in) for n, em in editable.items()})
    with pytest.raises(ConfigError, match="setup"):
        editor.predict_update(small_world_model.model, {n: em.module for n, em in editable.items()},
                              edit_batch(small_world_model, small_edit_requests[:1]))
    with pytest.raises(ConfigError, match="statistics"):
        editor.setup(EditContext(small_world_model.model, small_world_model.tokenizer,
                                 {n: em.module for n, em in editable.items()}, None))
