"""Layer specs: brace expansion, resolution on Llama and GPT-2 (Conv1D), and every shipped model config."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
)

from rledit.errors import LayerSpecError
from rledit.models.layers import expand_layer_spec, resolve_edit_modules
from rledit.models.loading import load_model
from tests.conftest import composed_model_config

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
SHIPPED = sorted(p for p in MODEL_CONFIGS.glob("*.yaml") if p.name != "tiny.yaml")

TINY = {"hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 2,
        "vocab_size": 32}
# The architecture of each shipped config at its real depth (width is irrelevant to module names).
ARCHITECTURES = {
    "smollm2-135m": LlamaConfig(num_hidden_layers=30, **TINY),
    "llama3-8b-instruct": LlamaConfig(num_hidden_layers=32, **TINY),
    "mistral-7b-v0.3": MistralConfig(num_hidden_layers=32, **TINY),
    "gemma2-9b": Gemma2Config(num_hidden_layers=42, head_dim=8, **TINY),
    "qwen2.5-7b": Qwen2Config(num_hidden_layers=28, **TINY),
    "gpt2-xl": GPT2Config(n_layer=48, n_embd=16, n_head=2, vocab_size=32),
    "gpt-j-6b": GPTJConfig(n_layer=28, n_embd=16, n_head=2, rotary_dim=4, vocab_size=32),
}


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **TINY))


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=32, n_positions=32))


@pytest.mark.parametrize("spec, expected", [
    ("model.layers.3.mlp.gate_proj", ["model.layers.3.mlp.gate_proj"]),
    ("model.layers.{11-13}.mlp.gate_proj",
     ["model.layers.11.mlp.gate_proj", "model.layers.12.mlp.gate_proj", "model.layers.13.mlp.gate_proj"]),
    ("h.{4-4}.x", ["h.4.x"]),
    ("m.{gate_proj,up_proj}", ["m.gate_proj", "m.up_proj"]),
    ("transformer.h.{1,3,5-7}.mlp.c_fc", [f"transformer.h.{i}.mlp.c_fc" for i in (1, 3, 5, 6, 7)]),
    ("l.{1-2}.mlp.{gate_proj, up_proj}", ["l.1.mlp.gate_proj", "l.1.mlp.up_proj",
                                          "l.2.mlp.gate_proj", "l.2.mlp.up_proj"]),
    ("a.{b{1-2},c}", ["a.b1", "a.b2", "a.c"]),
    ("l.{1,1-2}", ["l.1", "l.2"]),
])
def test_expansion(spec: str, expected: list[str]) -> None:
    assert expand_layer_spec(spec) == expected


def test_expansion_size_multiplies_across_groups() -> None:
    names = expand_layer_spec("model.layers.{22-30}.mlp.{gate_proj,up_proj}")
    assert len(names) == 18 and len(set(names)) == 18


@pytest.mark.parametrize("spec, problem", [
    ("model.layers.{11-15.mlp", "unbalanced"),
    ("model.layers.11-15}.mlp", "unbalanced"),
    ("model.layers.}1{.mlp", "unbalanced"),
    ("model.layers.{}.mlp", "empty alternative"),
    ("model.mlp.{gate_proj,}", "empty alternative"),
    ("model.layers.{15-11}.mlp", "reversed range"),
    ("", "empty"),
])
def test_malformed_specs_raise_naming_the_spec(spec: str, problem: str) -> None:
    with pytest.raises(LayerSpecError, match=problem) as info:
        expand_layer_spec(spec)
    assert repr(spec) in str(info.value)


def test_llama_resolution_is_ordered_deduplicated_and_untransposed(llama: LlamaForCausalLM) -> None:
    found = resolve_edit_modules(llama, ["model.layers.{2-3}.mlp.up_proj",
                                         "model.layers.{1,3}.mlp.{up_proj,gate_proj}",
                                         "model.layers.3.mlp.up_proj"])
    assert list(found) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                           "model.layers.2.mlp.up_proj",
                           "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"]
    gate = found["model.layers.1.mlp.gate_proj"]
    assert gate.module is llama.model.layers[1].mlp.gate_proj
    assert (gate.d_in, gate.d_out, gate.transposed) == (16, 24, False)
    assert gate.weight_view() is gate.module.weight


def test_gpt2_conv1d_weight_view_is_d_out_by_d_in_and_shares_storage(gpt2: GPT2LMHeadModel) -> None:
    found = resolve_edit_modules(gpt2, "transformer.h.{1-2}.mlp.{c_fc,c_proj}")
    c_fc, c_proj = found["transformer.h.1.mlp.c_fc"], found["transformer.h.1.mlp.c_proj"]
    assert (c_fc.d_in, c_fc.d_out, c_fc.transposed) == (16, 64, True)
    assert (c_proj.d_in, c_proj.d_out) == (64, 16)
    view = c_fc.weight_view()
    assert view.shape == (64, 16)
    assert view.data_ptr() == c_fc.module.weight.data_ptr()
    x = torch.randn(5, 16)
    torch.testing.assert_close(c_fc.module(x), x @ view.T + c_fc.module.bias)


def test_no_match_names_the_spec_and_near_matches(llama: LlamaForCausalLM) -> None:
    with pytest.raises(LayerSpecError) as info:
        resolve_edit_modules(llama, "model.layers.{2-9}.mlp.gate_proj")
    message = str(info.value)
    assert "'model.layers.{2-9}.mlp.gate_proj'" in message and "'model.layers.4.mlp.gate_proj'" in message
    assert "model.layers.3.mlp.gate_proj" in message.split("near matches:")[1]

    with pytest.raises(LayerSpecError, match=r"'model\.layers\.1\.mlp\.gate_prj'.*near matches:.*"
                                             r"model\.layers\.1\.mlp\.gate_proj"):
        resolve_edit_modules(llama, "model.layers.1.mlp.gate_prj")


def test_non_linear_module_is_refused_with_its_type(llama: LlamaForCausalLM) -> None:
    with pytest.raises(LayerSpecError, match=r"'model\.layers\.0\.mlp' is a LlamaMLP"):
        resolve_edit_modules(llama, "model.layers.{0-1}.mlp")


def test_empty_spec_list_is_refused(llama: LlamaForCausalLM) -> None:
    with pytest.raises(LayerSpecError, match="no layer specs"):
        resolve_edit_modules(llama, [])


def test_every_architecture_check_has_a_shipped_config() -> None:
    assert set(ARCHITECTURES) <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_is_well_formed(path: Path) -> None:
    cfg = composed_model_config(path.stem)
    assert cfg.name == path.stem
    assert cfg.load._target_ == "rledit.models.loading.load_model"
    load_args = {k: v for k, v in OmegaConf.to_container(cfg.load).items() if k != "_target_"}
    inspect.signature(load_model).bind(**load_args)
    assert cfg.max_length > 0
    assert all(expand_layer_spec(spec) for spec in cfg.edit_modules)


@pytest.mark.parametrize("stem", sorted(ARCHITECTURES))
def test_shipped_specs_resolve_on_the_architecture(stem: str) -> None:
    cfg = composed_model_config(stem)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(ARCHITECTURES[stem])
    found = resolve_edit_modules(model, list(cfg.edit_modules))
    assert len(found) == sum(len(expand_layer_spec(spec)) for spec in cfg.edit_modules)
    for module in found.values():
        assert module.weight_view().shape == (module.d_out, module.d_in)
