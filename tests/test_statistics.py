"""Preserved-knowledge statistics: streaming equals all keys at once, the cache is reused and keyed by what
matters, text sources say what they are, bad sources are clear errors."""

from __future__ import annotations

import pytest
import torch

from rledit.data.collate import EditCollator
from rledit.data.records import EditRecord
from rledit.data.text import RecordPrompts, SampledText, TextFile
from rledit.errors import ConfigError
from rledit.models import statistics as statistics_module
from rledit.models.layers import resolve_edit_modules
from rledit.models.statistics import PreservedStatistics, token_batches
from rledit.threads import cpu_threads

SPEC = "model.layers.{0-2}.mlp.down_proj"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with cpu_threads(1):
        yield


@pytest.fixture
def modules(small_world_model):
    return {name: em.module for name, em in resolve_edit_modules(small_world_model.model, SPEC).items()}


@pytest.fixture
def text_file(small_world_model, tmp_path):
    path = tmp_path / "text.txt"
    sentences = small_world_model.world.heldout_sentences(60, seed=3)
    path.write_text("\n\n".join(sentences) + "\n", encoding="utf-8")  # blank lines are skipped
    return path


def test_streamed_second_moments_equal_all_keys_at_once(small_world_model, modules, text_file, tmp_path):
    model, tokenizer = small_world_model.model, small_world_model.tokenizer
    stats = PreservedStatistics(TextFile(str(text_file)), num_tokens=300, batch_size=7, cache_dir=str(tmp_path),
                                progress=False)
    streamed = stats.second_moments(model, tokenizer, modules)
    texts = list(TextFile(str(text_file)).texts(model, tokenizer, ()))
    ids, mask = next(token_batches(texts, tokenizer, len(texts), 256))
    keys = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: keys.__setitem__(n, a[0])) for n, m in modules.items()]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    # the first 300 tokens in text order (row-major over rows of one text each)
    order = torch.cat([torch.arange(int(mask[r].sum())) + r * ids.shape[1] for r in range(len(texts))])[:300]
    for name, C in streamed.items():
        k = keys[name].reshape(-1, keys[name].shape[-1])[order].double()
        assert torch.allclose(C.double(), k.T @ k / 300, rtol=1e-5, atol=1e-6), name
    assert stats.describe()["source"]["kind"] == "file"
    assert stats.describe()["computed_now"] == sorted(modules)


def test_the_cache_is_reused_and_keyed_by_source_and_token_count(small_world_model, modules, text_file, tmp_path,
                                                                  monkeypatch):
    model, tokenizer = small_world_model.model, small_world_model.tokenizer
    first = PreservedStatistics(TextFile(str(text_file)), num_tokens=200, cache_dir=str(tmp_path), progress=False)
    computed = first.second_moments(model, tokenizer, modules)
    files = sorted(p.name for p in (tmp_path / "statistics").rglob("*") if p.is_file())
    assert files == sorted(f"{name}.safetensors" for name in modules)  # no partial files left behind

    def no_computing(*args, **kwargs):
        raise AssertionError("computed again although cached")

    with monkeypatch.context() as patch:
        patch.setattr(statistics_module, "accumulate_second_moments", no_computing)
        again = PreservedStatistics(TextFile(str(text_file)), num_tokens=200, cache_dir=str(tmp_path), progress=False)
        cached = again.second_moments(model, tokenizer, modules)
    assert all(torch.equal(cached[n], computed[n]) for n in modules)
    assert again.describe()["computed_now"] == []
    more = PreservedStatistics(TextFile(str(text_file)), num_tokens=250, cache_dir=str(tmp_path), progress=False)
    other = PreservedStatistics(SampledText(num_texts=40, length=10), num_tokens=200, cache_dir=str(tmp_path),
                                progress=False)
    more.second_moments(model, tokenizer, modules)
    other.second_moments(model, tokenizer, modules)
    assert len(list((tmp_path / "statistics").iterdir())) == 3


def test_no_token_count_averages_every_token_of_the_source(small_world_model, modules, text_file, tmp_path):
    model, tokenizer = small_world_model.model, small_world_model.tokenizer
    texts = list(TextFile(str(text_file)).texts(model, tokenizer, ()))
    total = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    unbounded = PreservedStatistics(TextFile(str(text_file)), num_tokens=None, cache_dir=str(tmp_path / "a"),
                                    progress=False)
    every = unbounded.second_moments(model, tokenizer, modules)
    assert unbounded.describe()["tokens"] == total
    unbounded.second_moments(model, tokenizer, modules)
    assert unbounded.describe()["computed_now"] == [] and unbounded.describe()["tokens"] == total  # from the cache
    counted = PreservedStatistics(TextFile(str(text_file)), num_tokens=total, cache_dir=str(tmp_path / "b"),
                                  progress=False).second_moments(model, tokenizer, modules)
    fewer = PreservedStatistics(TextFile(str(text_file)), num_tokens=total - 50, cache_dir=str(tmp_path / "c"),
                                progress=False).second_moments(model, tokenizer, modules)
    for name in modules:
        torch.testing.assert_close(every[name], counted[name], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(every[name], fewer[name], rtol=1e-4, atol=1e-5)


def test_sampled_text_is_seeded(small_world_model):
    model, tokenizer = small_world_model.model, small_world_model.tokenizer
    source = SampledText(num_texts=6, length=8, seed=1)
    assert list(source.texts(model, tokenizer, ())) == list(source.texts(model, tokenizer, ()))
    assert list(source.texts(model, tokenizer, ())) != list(SampledText(6, 8, seed=2).texts(model, tokenizer, ()))


def test_record_prompts_identify_their_records():
    records = [EditRecord("a", "The capital of X is", "Y", "Z")]
    other = [EditRecord("a", "The capital of W is", "Y", "Z")]
    assert RecordPrompts().identity(records) != RecordPrompts().identity(other)
    assert list(RecordPrompts().texts(None, None, records)) == ["The capital of X is Z"]
    with pytest.raises(ConfigError, match="needs training records"):
        list(RecordPrompts().texts(None, None, []))


def test_bad_sources_and_options_are_clear_errors(small_world_model, modules, tmp_path):
    model, tokenizer = small_world_model.model, small_world_model.tokenizer
    with pytest.raises(ConfigError, match="no such file"):
        PreservedStatistics(TextFile(str(tmp_path / "missing.txt")), cache_dir=str(tmp_path),
                            progress=False).second_moments(model, tokenizer, modules)
    short = tmp_path / "short.txt"
    short.write_text("The occupation of\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="only 4 tokens, fewer than stats.num_tokens=1000"):
        PreservedStatistics(TextFile(str(short)), num_tokens=1000, cache_dir=str(tmp_path),
                            progress=False).second_moments(model, tokenizer, modules)
    with pytest.raises(ConfigError, match="accumulate"):
        PreservedStatistics(TextFile(str(short)), accumulate="float16")
    with pytest.raises(ConfigError, match="num_tokens"):
        PreservedStatistics(TextFile(str(short)), num_tokens=0)


def test_edit_rows_carry_the_subjects_token_span(small_world_model, small_edit_requests):
    tokenizer = small_world_model.tokenizer
    requests = small_edit_requests[:6]
    batch = EditCollator(tokenizer)(requests)
    for tokenized in (batch.edit, batch.rephrase):
        for row in range(tokenized.num_rows):
            first, last = int(tokenized.subject_first[row]), int(tokenized.subject_last[row])
            subject = requests[int(tokenized.request_index[row])].subject
            assert tokenizer.decode(tokenized.input_ids[row, first:last + 1]) == subject
    assert batch.locality.subject_last is None
    no_subject = EditRecord("x", requests[0].prompt, requests[0].target_new, subject="Nobody")
    assert EditCollator(tokenizer)([no_subject]).edit.subject_last.tolist() == [-1]
