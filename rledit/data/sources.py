"""Where an experiment's edit requests come from: the synthetic world of the model, or record files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rledit.data.collate import EditCollator
from rledit.data.loading import check_records, load_records
from rledit.data.records import EditRecord
from rledit.data.streams import split_records
from rledit.data.synthetic.world import split_subjects
from rledit.data.synthetic.world_model import WorldModel
from rledit.errors import ConfigError


@dataclass
class EditData:
    """Training and evaluation requests (disjoint), plus held-out text for perplexity when there is some."""

    train: list[EditRecord]
    eval: list[EditRecord]
    heldout_text: list[str] | None = None
    skipped: int = 0


def synthetic_records(loaded: WorldModel, collator: EditCollator, eval_fraction: float = 0.5,
                      locality_per_request: int = 3, seed: int = 0, heldout_sentences: int = 200,
                      validation_fraction: float | None = None, split_seed: int | None = None) -> EditData:
    """Counterfactual requests on the synthetic world the model was pretrained on; subjects split train/eval.

    `validation_fraction` evaluates on that share of the *training* subjects instead (and trains on the rest),
    so settings can be chosen without looking at the evaluation subjects. `split_seed` draws the split (None:
    `seed`): held fixed, runs of different seeds draw other requests and orders from the same subjects, so an
    editor trained on one seed's training subjects never meets them in another seed's evaluation.
    Every request is checked against `collator`: a max_length too short for the world's sentences fails here.
    """
    if not isinstance(loaded, WorldModel):
        raise ConfigError("data=synthetic edits the synthetic world's own model: use model=tiny "
                          "(or a data set such as data=counterfact for other models)")
    world = loaded.world
    split_seed = seed if split_seed is None else split_seed
    split = world.split_subjects(eval_fraction=eval_fraction, seed=split_seed)
    if validation_fraction is not None:
        split = split_subjects(split.train, validation_fraction, split_seed)

    def requests(subjects, request_seed):
        # Locality prompts ask true facts of the other side's subjects: those are never edited by this
        # side's stream, so their answers stay true however many of its requests are committed.
        records = world.edit_requests(subjects, seed=request_seed, locality_per_request=locality_per_request)
        check_records(records, collator.row_problems, "synthetic world")
        return records

    return EditData(train=requests(split.train, seed), eval=requests(split.eval, seed + 1),
                    heldout_text=world.heldout_sentences(heldout_sentences, seed=seed))


def file_records(loaded, collator: EditCollator, train: str, eval: str | None = None,
                 eval_size: int | None = None, seed: int = 0, dialect: str = "auto",
                 on_bad_record: str = "error", limit: int | None = None) -> EditData:
    """Requests from local JSON/JSONL files or Hub data sets; without an eval file, a seeded split of train.

    Records `collator` cannot collate (prompt + target longer than the model's context, for one) are bad
    records: refused with a DataError naming file, record and field, or skipped and counted.
    """
    train_loaded = load_records(_existing_or_hub(train), dialect=dialect, on_bad_record=on_bad_record,
                                limit=limit, check=collator.row_problems)
    if eval is not None:
        eval_loaded = load_records(_existing_or_hub(eval), dialect=dialect, on_bad_record=on_bad_record,
                                   check=collator.row_problems)
        return EditData(train_loaded.records, eval_loaded.records,
                        skipped=train_loaded.skipped + eval_loaded.skipped)
    if eval_size is None:
        raise ConfigError("data: give either an `eval` file or an `eval_size` to split from `train`")
    train_part, eval_part = split_records(train_loaded.records, eval_size, seed)
    return EditData(list(train_part), list(eval_part), skipped=train_loaded.skipped)


def _existing_or_hub(source: str) -> str:
    """Relative paths are taken from the directory the command was started in (Hydra does not chdir)."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source
