"""Shared fixtures: a small synthetic world and its pretrained model, built once per test session."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from rledit.data.collate import EditCollator
from rledit.data.records import EditRecord
from rledit.data.synthetic import WorldModel, load_world_model
from rledit.errors import PretrainingError
from rledit.models.layers import resolve_edit_modules
from rledit.paths import CONFIG_DIR

# The default architecture on a small world, trained until every template reaches the default target
# accuracy (0.98) within the budget, so edits on it are measurable on any CPU.
SMALL_WORLD = {"seed": 0, "num_subjects": 40, "objects_per_relation": 8}
SMALL_TRAINING = {"epochs": 16, "max_epochs": 40, "batch_size": 32, "learning_rate": 1.5e-3}


@pytest.fixture(scope="session")
def small_world_model(tmp_path_factory: pytest.TempPathFactory) -> WorldModel:
    """The default architecture pretrained on the small world, cached in a session temporary folder."""
    try:
        return load_world_model(SMALL_WORLD, training=SMALL_TRAINING,
                                cache_dir=tmp_path_factory.mktemp("rledit-cache"), progress=False)
    except PretrainingError as error:
        pytest.fail(f"fixture not ready: the small world model does not know its world: {error}")


@pytest.fixture(scope="session")
def small_edit_requests(small_world_model: WorldModel) -> list[EditRecord]:
    """Counterfactual edits on the evaluation half of the small world's subjects (160 requests)."""
    world = small_world_model.world
    return world.edit_requests(world.split_subjects(eval_fraction=0.5, seed=0).eval, seed=0)


@pytest.fixture(scope="session")
def small_training_requests(small_world_model: WorldModel) -> list[EditRecord]:
    """Edits on the other half of the subjects: a training stream disjoint from `small_edit_requests`."""
    world = small_world_model.world
    return world.edit_requests(world.split_subjects(eval_fraction=0.5, seed=0).train, seed=1)


@pytest.fixture(scope="session")
def ridge_edit_setup(small_world_model, small_edit_requests):
    """The small world's model, gate/up of layers 1-2 as edited modules, their shapes, three batches of 5 edits."""
    editable = resolve_edit_modules(small_world_model.model, "model.layers.{1-2}.mlp.{gate_proj,up_proj}")
    shapes = {name: (em.d_out, em.d_in) for name, em in editable.items()}
    collate = EditCollator(small_world_model.tokenizer)
    batches = [collate(small_edit_requests[i:i + 5]).edit for i in range(0, 15, 5)]
    return small_world_model.model, editable, shapes, batches


@pytest.fixture(scope="session")
def small_world(small_world_model) -> list[str]:
    """Overrides that make model=tiny the small world of this file, loaded from its session cache."""
    cache_dir = small_world_model.path.parent.parent
    return [f"model.load.world.num_subjects={SMALL_WORLD['num_subjects']}",
            f"model.load.world.objects_per_relation={SMALL_WORLD['objects_per_relation']}",
            *[f"model.load.training.{key}={value}" for key, value in SMALL_TRAINING.items()],
            f"model.load.cache_dir={cache_dir}", "model.load.progress=false",
            "num_steps=3", "edits_per_step=4", "cpu_threads=1"]


def composed_model_config(stem: str):
    """configs/model/<stem>.yaml as the entry points see it (its shared base merged in)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose("evaluate", overrides=[f"model={stem}"]).model
