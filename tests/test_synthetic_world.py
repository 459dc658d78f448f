"""The embedded synthetic world: generation, tokenizer, edit requests, pretraining cache and model quality."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from rledit.data.collate import EditCollator
from rledit.data.sources import synthetic_records
from rledit.data.synthetic import (
    WorldModel,
    build_tokenizer,
    build_world,
    load_world_model,
    token_accuracy,
    world_accuracy,
)
from rledit.data.synthetic import world_model as world_model_module
from rledit.data.synthetic.portable import portable_llama, standard_llama
from rledit.data.synthetic.pretrain import PretrainConfig, model_config, pretrain
from rledit.data.synthetic.relations import fixed_words
from rledit.data.synthetic.world import World
from rledit.errors import ConfigError, PretrainingError

TINY_WORLD = {"seed": 3, "num_subjects": 12, "objects_per_relation": 4}


@pytest.fixture(scope="module")
def world() -> World:
    return build_world({"seed": 7, "num_subjects": 60, "objects_per_relation": 10})


@pytest.fixture(scope="module")
def tokenizer(world: World) -> PreTrainedTokenizerFast:
    return build_tokenizer(world)


def test_same_seed_gives_the_same_world_and_token_ids(world: World, tokenizer: PreTrainedTokenizerFast):
    again = build_world({"seed": 7, "num_subjects": 60, "objects_per_relation": 10})
    assert again == world
    assert build_tokenizer(again).get_vocab() == tokenizer.get_vocab()
    other = build_world({"seed": 8, "num_subjects": 60, "objects_per_relation": 10})
    assert other.subjects != world.subjects


def test_relations_have_paraphrases_and_a_heldout_template(world: World):
    assert len(world.relations) >= 8
    for relation in world.relations:
        assert len(relation.templates) >= 3, relation.name
        assert len(set(relation.templates)) == len(relation.templates)
        assert relation.heldout_template not in relation.templates
        for template in (*relation.templates, relation.heldout_template):
            assert template.count("{s}") == 1, template


def test_every_subject_has_one_object_per_relation_from_that_relations_pool(world: World):
    assert len(world.facts) == len(world.subjects) * len(world.relations)
    for fact in world.facts:
        assert fact.object in world.objects[fact.relation]
    assert len({(f.subject, f.relation) for f in world.facts}) == len(world.facts)


def test_invented_names_are_unique_pronounceable_and_not_template_or_object_words(world: World):
    fixed = fixed_words()
    object_words = [word for pool in world.objects.values() for o in pool for word in o.split()]
    names = [*world.subjects, *(word for word in object_words if word not in fixed)]
    assert len(names) > len(world.subjects) + 3 * 10  # subjects, cities, languages, countries, companies
    assert len({name.lower() for name in names}) == len(names)
    assert {"occupation", "Shipyards", "ship", "Port"} <= fixed
    for name in names:
        assert re.fullmatch(r"[A-Z][a-z]{3,}", name), name
        assert name.lower() not in {word.lower() for word in fixed}, name
        assert not re.search(r"[^aeiouy]{4}", name.lower()), f"{name} has 4 consonants in a row"


def test_some_objects_span_several_tokens(world: World, tokenizer: PreTrainedTokenizerFast):
    lengths = [len(tokenizer(" " + o, add_special_tokens=False)["input_ids"])
               for pool in world.objects.values() for o in pool]
    assert min(lengths) == 1 and max(lengths) >= 2


def test_target_tokens_are_the_same_alone_and_after_the_prompt(world: World,
                                                               tokenizer: PreTrainedTokenizerFast):
    vocab = tokenizer.get_vocab()
    for prompt, target, _ in world.prompts_and_objects()[:200]:
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        assert target_ids == [vocab[word] for word in target.split()]
        assert prompt_ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in prompt_ids[1:]
        assert prompt_ids + target_ids == tokenizer(f"{prompt} {target}")["input_ids"]
        assert tokenizer.unk_token_id not in prompt_ids + target_ids
        assert tokenizer.decode(target_ids) == target
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_edit_requests_are_counterfactual_with_rephrases_and_locality_from_other_subjects(world: World):
    split = world.split_subjects(eval_fraction=0.5, seed=0)
    requests = world.edit_requests(split.eval, seed=0, locality_per_request=3)
    assert len(requests) == len(split.eval) * len(world.relations)
    assert len({r.record_id for r in requests}) == len(requests)
    for request in requests:
        relation = world.relation(request.record_id.split(":")[1])
        assert request.target_true == world.true_object(request.subject, relation.name)
        assert request.target_new != request.target_true
        assert request.target_new in world.objects[relation.name]
        rendered = [relation.render(t, request.subject) for t in relation.templates]
        assert request.prompt in rendered
        assert sorted(request.rephrase_prompts) == sorted(p for p in rendered if p != request.prompt)
        assert len(request.locality) == 3
        for pair in request.locality:
            other = next(s for s in world.subjects if re.search(rf"\b{s}\b", pair.prompt))
            assert other not in split.eval
            matching = [r for r in world.relations
                        if pair.prompt in [r.render(t, other) for t in r.templates]]
            assert [world.true_object(other, r.name) for r in matching] == [pair.answer]


def test_edit_requests_are_seeded(world: World):
    subjects = world.subjects[:10]
    assert world.edit_requests(subjects, seed=4) == world.edit_requests(subjects, seed=4)
    assert world.edit_requests(subjects, seed=4) != world.edit_requests(subjects, seed=5)


def test_training_and_evaluation_subjects_are_disjoint(world: World):
    split = world.split_subjects(eval_fraction=0.25, seed=1)
    assert not set(split.train) & set(split.eval)
    assert sorted(split.train + split.eval) == sorted(world.subjects)
    assert len(split.eval) == 15


def test_two_word_subjects_are_unique_pairs_of_recurring_words():
    world = build_world({"seed": 7, "num_subjects": 60, "objects_per_relation": 10, "subject_words": 2})
    tokenizer = build_tokenizer(world)
    assert len(set(world.subjects)) == 60
    words = [subject.split() for subject in world.subjects]
    assert all(len(pair) == 2 for pair in words)
    for position in (0, 1):
        counts = [sum(pair[position] == w for pair in words) for w in {pair[position] for pair in words}]
        assert max(counts) > 1 and sum(counts) / len(counts) > 2  # a word alone does not name a subject
    request = world.edit_requests(world.subjects[:1])[0]
    subject_ids = tokenizer(request.subject, add_special_tokens=False)["input_ids"]
    assert len(subject_ids) == 2 and tokenizer.unk_token_id not in subject_ids


def test_heldout_sentences_use_heldout_templates_and_only_trained_words(world: World,
                                                                        tokenizer: PreTrainedTokenizerFast):
    sentences = world.heldout_sentences(50, seed=0)
    assert len(set(sentences)) == 50
    trained = world.prompts_and_objects()
    trained_ids = {i for ids in tokenizer([f"{p} {t}" for p, t, _ in trained])["input_ids"] for i in ids}
    true_heldout = {f"{relation.render(relation.heldout_template, fact.subject)} {fact.object}"
                    for fact in world.facts for relation in [world.relation(fact.relation)]}
    assert set(sentences) <= true_heldout
    for sentence in sentences:
        assert set(tokenizer(sentence)["input_ids"]) <= trained_ids, sentence
    assert not set(sentences) & {f"{p} {t}" for p, t, _ in trained}


def test_world_survives_its_json(world: World, tmp_path):
    world.save(tmp_path / "world.json")
    assert World.load(tmp_path / "world.json") == world


@pytest.mark.parametrize("bad, message", [
    ({"num_subjects": 2}, "num_subjects"),
    ({"objects_per_relation": 1}, "objects_per_relation"),
    ({"subjects": 10}, "unknown world option"),
    ({"subject_words": 3}, "subject_words"),
])
def test_bad_world_config_is_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        build_world(bad)


def test_bad_model_training_or_dtype_options_are_refused_before_any_training(tmp_path):
    with pytest.raises(ConfigError, match="hidden_dim"):
        load_world_model(TINY_WORLD, model={"hidden_dim": 64}, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="vocab_size"):
        load_world_model(TINY_WORLD, model={"vocab_size": 64}, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown training option.*lr"):
        load_world_model(TINY_WORLD, training={"lr": 1.0}, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="dtype"):
        load_world_model(TINY_WORLD, dtype="int8", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_pretraining_is_deterministic():
    world = build_world(TINY_WORLD)
    tokenizer = build_tokenizer(world)
    training = PretrainConfig(epochs=2, max_epochs=2, target_accuracy=0.0, batch_size=16)
    first, _ = pretrain(world, tokenizer, model_config(tokenizer), training, progress=False)
    second, _ = pretrain(world, tokenizer, model_config(tokenizer), training, progress=False)
    second_weights = second.state_dict()
    for name, weight in first.state_dict().items():
        assert torch.equal(weight, second_weights[name]), name


# Pretrains TINY_WORLD for two epochs and saves the weights to the path given.
_PRETRAIN_SCRIPT = f"""
import sys, torch
from rledit.data.synthetic import build_tokenizer, build_world
from rledit.data.synthetic.pretrain import PretrainConfig, model_config, pretrain
world = build_world({TINY_WORLD!r})
tokenizer = build_tokenizer(world)
training = PretrainConfig(epochs=2, max_epochs=2, target_accuracy=0.0, batch_size=16, threads=int(sys.argv[2]))
model, _ = pretrain(world, tokenizer, model_config(tokenizer), training, progress=False)
torch.save(model.state_dict(), sys.argv[1])
"""


def test_pretraining_gives_the_same_weights_on_another_cpu(tmp_path):
    """Portable kernels, another BLAS code path and two threads stand in for another CPU: float32
    pretraining ended 0.135 apart in one weight under them; the world model must come out bit for bit."""
    weights = {}
    for name, env, threads in [("native", {}, 1),
                               ("portable", {"ATEN_CPU_CAPABILITY": "default",
                                             "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, 2)]:
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _PRETRAIN_SCRIPT, str(path), str(threads)], check=True,
                       env={**os.environ, **env}, timeout=600)
        weights[name] = torch.load(path)
    for name, weight in weights["native"].items():
        assert torch.equal(weight, weights["portable"][name]), name


def test_pretraining_leaves_the_callers_random_state_alone():
    world = build_world(TINY_WORLD)
    tokenizer = build_tokenizer(world)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pretrain(world, tokenizer, model_config(tokenizer),
             PretrainConfig(epochs=1, max_epochs=1, target_accuracy=0.0, batch_size=64), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_the_float64_training_model_computes_what_the_saved_float32_llama_computes():
    tokenizer = build_tokenizer(build_world(TINY_WORLD))
    config = model_config(tokenizer)
    torch.manual_seed(0)
    training_model = portable_llama(config)
    with torch.no_grad():  # weights away from their initial values, norms included
        for parameter in training_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    saved = standard_llama(training_model, config)
    input_ids = torch.randint(0, len(tokenizer), (3, config.max_position_embeddings))
    expected = training_model(input_ids=input_ids).logits.float()
    assert torch.allclose(saved(input_ids=input_ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert next(saved.parameters()).dtype == torch.float32


def test_pretraining_runs_past_its_schedule_until_the_world_is_known_and_refuses_a_model_that_is_not():
    world = build_world(TINY_WORLD)
    tokenizer = build_tokenizer(world)
    training = PretrainConfig(epochs=2, max_epochs=80, target_accuracy=0.9, batch_size=16)
    model, report = pretrain(world, tokenizer, model_config(tokenizer), training, progress=False)
    assert report.epochs > training.epochs  # two epochs are far from enough for this world
    assert report.steps == report.epochs * 18  # 288 prompts in batches of 16
    accuracy = world_accuracy(model, tokenizer, world)
    assert accuracy == report.accuracy and min(accuracy["per_template"].values()) >= 0.9
    # it stopped at the first epoch that met the target: one epoch less is not enough, and says so
    short = PretrainConfig(epochs=2, max_epochs=report.epochs - 1, target_accuracy=0.9, batch_size=16)
    with pytest.raises(PretrainingError, match=r"after \d+ epochs, below training.target_accuracy=0.9; "
                                               r"raise training.max_epochs"):
        pretrain(world, tokenizer, model_config(tokenizer), short, progress=False)


@pytest.mark.parametrize("bad, message", [
    ({"epochs": 5, "max_epochs": 4}, "max_epochs must be >= epochs"),
    ({"floor_fraction": 0.0}, "floor_fraction"),
    ({"target_accuracy": 1.5}, "target_accuracy"),
])
def test_bad_pretraining_budget_is_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        PretrainConfig(**bad)


def test_small_model_knows_its_world(small_world_model: WorldModel):
    accuracy = world_accuracy(small_world_model.model, small_world_model.tokenizer, small_world_model.world)
    assert accuracy["overall"] >= 0.95
    assert len(accuracy["per_template"]) == sum(len(r.templates) for r in small_world_model.world.relations)
    assert min(accuracy["per_template"].values()) >= 0.9, accuracy["per_template"]


def test_loaded_model_is_frozen_with_the_saved_tokenizer(small_world_model: WorldModel):
    model = small_world_model.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert isinstance(model.model.layers[2].mlp.gate_proj, torch.nn.Linear)
    rebuilt = build_tokenizer(small_world_model.world)
    assert small_world_model.tokenizer.get_vocab() == rebuilt.get_vocab()
    prompt = small_world_model.world.prompts_and_objects()[0][0]
    assert small_world_model.tokenizer(prompt)["input_ids"] == rebuilt(prompt)["input_ids"]


def test_edits_of_the_small_world_start_unlearned(small_world_model: WorldModel, small_edit_requests):
    """Editors are judged by how far they raise efficacy, so unedited it must be low and the truth high.

    Later tokens of a multi-token object ("<name> Shipyards") follow from its first, so the new targets'
    token accuracy is not zero unedited; their first token, which carries the fact, must be."""
    model, tokenizer = small_world_model.model, small_world_model.tokenizer
    prompts = [r.prompt for r in small_edit_requests]
    new = token_accuracy(model, tokenizer, prompts, [r.target_new for r in small_edit_requests])
    first = token_accuracy(model, tokenizer, prompts, [r.target_new.split()[0] for r in small_edit_requests])
    true = token_accuracy(model, tokenizer, prompts, [r.target_true for r in small_edit_requests])
    assert sum(true) / len(true) >= 0.95
    assert sum(first) / len(first) <= 0.05
    assert sum(new) / len(new) <= 0.5 * sum(true) / len(true)


def test_small_training_and_evaluation_requests_edit_disjoint_subjects(small_edit_requests,
                                                                       small_training_requests):
    assert not {r.subject for r in small_edit_requests} & {r.subject for r in small_training_requests}


def test_validation_split_holds_out_training_subjects_only(small_world_model: WorldModel, small_edit_requests):
    collator = EditCollator(small_world_model.tokenizer)
    validation = synthetic_records(small_world_model, collator, validation_fraction=0.25)
    default = synthetic_records(small_world_model, collator)
    train, held_out = ({r.subject for r in records} for records in (validation.train, validation.eval))
    assert not train & held_out
    assert train | held_out == {r.subject for r in default.train}
    assert len(held_out) == 5  # a quarter of the 20 training subjects
    assert not held_out & {r.subject for r in small_edit_requests}


@pytest.mark.parametrize("validation_fraction", [None, 0.25])
def test_a_fixed_split_seed_keeps_each_sides_subjects_across_seeds(small_world_model: WorldModel,
                                                                   validation_fraction):
    collator = EditCollator(small_world_model.tokenizer)

    def sides(**options):
        data = synthetic_records(small_world_model, collator, validation_fraction=validation_fraction, **options)
        return data, [{r.subject for r in records} for records in (data.train, data.eval)]

    first, first_sides = sides(seed=0, split_seed=0)
    other, other_sides = sides(seed=1, split_seed=0)
    assert other_sides == first_sides
    # another seed draws other requests of the same subjects: new objects or another order
    assert [(r.subject, r.target_new) for r in other.eval] != [(r.subject, r.target_new) for r in first.eval]
    _, reseeded_sides = sides(seed=1)  # no split_seed: the seed draws the split too
    assert reseeded_sides != first_sides


def test_second_load_reuses_the_cache_without_training(small_world_model: WorldModel, monkeypatch):
    report = small_world_model.path / "pretraining.json"
    written = report.stat().st_mtime_ns
    recorded = json.loads(report.read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("pretrained again although the cache exists")

    monkeypatch.setattr(world_model_module, "pretrain", no_training)
    again = load_world_model(recorded["world"], recorded["model"], recorded["training"],
                             cache_dir=small_world_model.path.parents[1], dtype="bfloat16", progress=False)
    assert again.path == small_world_model.path
    assert report.stat().st_mtime_ns == written
    assert recorded["accuracy"]["overall"] >= 0.95
    assert again.model.dtype == torch.bfloat16
    assert again.world == small_world_model.world


def test_interrupted_pretraining_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(world_model_module, "pretrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_world_model(TINY_WORLD, cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "synthetic").iterdir()) == []


def test_cache_folder_depends_on_every_config():
    key = world_model_module.cache_key
    world_config = build_world(TINY_WORLD).config
    base = key(world_config, {}, PretrainConfig())
    assert key(world_config, {}, PretrainConfig()) == base
    assert key(build_world({**TINY_WORLD, "seed": 4}).config, {}, PretrainConfig()) != base
    assert key(world_config, {"hidden_size": 64}, PretrainConfig()) != base
    assert key(world_config, {}, PretrainConfig(epochs=3)) != base


@pytest.mark.slow
def test_default_world_model_meets_the_bars_within_five_minutes(tmp_path):
    """The README's promise for the entry points' default model; prints the measured numbers (-s)."""
    loaded = load_world_model(cache_dir=tmp_path)
    report = json.loads((loaded.path / "pretraining.json").read_text())
    accuracy = report["accuracy"]
    worst = min(accuracy["per_template"].values())
    print(f"\ndefault world model: {len(loaded.world.subjects)} subjects x {len(loaded.world.relations)} "
          f"relations, {sum(p.numel() for p in loaded.model.parameters())} parameters, pretrained in "
          f"{report['seconds']:.0f} s ({report['steps']} steps); accuracy {accuracy['overall']:.4f} overall, "
          f"{worst:.4f} on the worst template, {accuracy['heldout']:.4f} on held-out templates")
    assert accuracy["overall"] >= 0.95
    assert worst >= 0.9
    assert report["seconds"] <= 300
    assert len(loaded.world.split_subjects(eval_fraction=0.5).eval) * len(loaded.world.relations) >= 1000
