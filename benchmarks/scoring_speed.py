"""Evaluation scoring speed: the final protocol's two model states (pre-edit, final) scored as rledit scored
them before (every row whole, in data order, full-vocabulary logits at every position, greedy generation
through `generate` with its KV cache), as it scores them now (`rledit.evaluation.scoring`), and the floor.

    python benchmarks/scoring_speed.py                          # SmolLM2-135M, 1,000 CounterFact-val requests
    python benchmarks/scoring_speed.py --requests 100 --threads 2

The final state is the model with seeded noise added to its locate-then-edit layers (an edit's worth of
change without an editor's cost), scored against the pre-edit predictions as the protocol does. Both
ways must give the same metrics (reported: the largest difference). The floor is the forward work the
metrics strictly need: every distinct prefix token once (the prompt of the new and of the true target
shared, as a KV cache would), at the per-token rate of the body (no output head) measured on the same
machine in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch
from harness import compose_config
from transformers import GenerationConfig

from rledit.data.collate import IGNORE_INDEX, TokenizedBatch
from rledit.editing.losses import forward_logits
from rledit.evaluation import scoring
from rledit.evaluation.metrics import per_request_mean, rows_from_tokens
from rledit.evaluation.scoring import RequestScorer, model_device, scoring_plan, swapped_targets
from rledit.pipeline import build_experiment
from rledit.threads import cpu_threads


def whole_rows(model, batch: TokenizedBatch, chunk_rows: int):
    """Before: rows in data order, each chunk a full forward pass with the head at every position."""
    parts = []
    for start in range(0, batch.num_rows, chunk_rows):
        chunk = batch.rows(start, start + chunk_rows)
        logits, labels = forward_logits(model, chunk)[:, :-1].float(), chunk.labels[:, 1:]
        rows, positions = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
        targets = labels[rows, positions]
        selected = logits[rows, positions]
        log_probs = selected.gather(-1, targets[:, None])[:, 0] - selected.logsumexp(-1)
        parts.append(rows_from_tokens(log_probs, selected.argmax(-1), targets, rows, chunk.num_rows))
    return type(parts[0]).concat(parts)


def generated_exact_match(model, batch: TokenizedBatch, chunk_rows: int, pad_token_id: int) -> torch.Tensor:
    """Before: left-pad each chunk's prompts and decode greedily with `generate`."""
    matches = []
    for start in range(0, batch.num_rows, chunk_rows):
        chunk = batch.rows(start, start + chunk_rows)
        is_target = chunk.labels != IGNORE_INDEX
        prompts = [ids[m.bool() & ~t] for ids, m, t in zip(chunk.input_ids, chunk.attention_mask, is_target)]
        targets = [labels[t] for labels, t in zip(chunk.labels, is_target)]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_token_id)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):], attention_mask[row, width - len(prompt):] = prompt, 1
        config = GenerationConfig(max_new_tokens=max(len(t) for t in targets), do_sample=False, num_beams=1,
                                  pad_token_id=pad_token_id)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        matches += [float(generated[row, width:width + len(t)].tolist() == t.tolist()) for row, t in enumerate(targets)]
    return torch.tensor(matches, dtype=torch.float64)


def score_before(scorer: RequestScorer, batch, reference, pad_token_id: int) -> dict:
    without_generation = RequestScorer(scorer.model, scorer.chunk_rows, scorer.collator, generation=False)
    with mock.patch.object(scoring, "score_rows", whole_rows):
        summary = without_generation.score(batch, reference)
    matches = generated_exact_match(scorer.model, batch.edit, scorer.chunk_rows, pad_token_id)
    summary.values["generation_exact_match"] = per_request_mean(matches, batch.edit.request_index,
                                                                len(batch.records))
    return summary


def distinct_prefix_tokens(plan: scoring.ScoringPlan) -> int:
    """Tokens of the prefix tree of the planned sequences: what a perfect KV cache would compute."""
    return len({sequence[:end] for sequence in plan.sequences for end in range(1, len(sequence) + 1)})


@torch.no_grad()
def body_seconds_per_token(model, plan: scoring.ScoringPlan, chunk_rows: int) -> float:
    """Wall seconds per (padded) token of the model body over the planned sequences, head excluded."""
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(plan.sequences), chunk_rows):
        input_ids, attention_mask = scoring.pad_right(plan.sequences[start:start + chunk_rows], 0)
        model.base_model(input_ids=input_ids, attention_mask=attention_mask)
        tokens += input_ids.numel()
    return (time.perf_counter() - started) / tokens


def perturb(model, modules, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for em in modules.values():
            weight = em.module.weight
            weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of configs/evaluate.yaml")
    args = parser.parse_args()
    data = "synthetic" if args.model == "tiny" else "counterfact"
    cfg = compose_config("evaluate", [f"model={args.model}", f"data={data}", *args.overrides])
    with cpu_threads(args.threads):
        experiment = build_experiment(cfg)
        model, collator = experiment.model.eval(), experiment.collator
        assert model_device(model).type == "cpu", "this benchmark times the CPU"
        records = experiment.data.eval[:args.requests]
        batch = collator(records)
        pad = experiment.loaded.tokenizer.pad_token_id
        scorer = RequestScorer(model, args.eval_batch_size, collator)
        seconds = {"before": 0.0, "now": 0.0}
        differences, reference = {}, None
        for state in ("pre-edit", "final"):
            if state == "final":
                perturb(model, experiment.editable, 0.05, seed=0)
            started = time.perf_counter()
            now = scorer.score(batch, reference)
            seconds["now"] += time.perf_counter() - started
            started = time.perf_counter()
            before = score_before(scorer, batch, reference, pad)
            seconds["before"] += time.perf_counter() - started
            for name, values in now.summary().items():
                previous = before.summary()[name]
                differences[f"{state}/{name}"] = (values, previous, abs((values or 0) - (previous or 0)))
            reference = reference or now.locality_predictions
        everything = [batch.edit, batch.rephrase, batch.locality]
        swapped = collator([swapped_targets(r) for r in records if r.target_true is not None])
        plan = scoring_plan(TokenizedBatch.concat(everything + [swapped.edit, swapped.rephrase, swapped.locality]))
        floor = 2 * distinct_prefix_tokens(plan) * body_seconds_per_token(model, plan, args.eval_batch_size)
    row_tokens = sum(int(b.attention_mask.sum()) for b in everything + [swapped.edit, swapped.rephrase,
                                                                       swapped.locality])
    report = {"model": args.model, "requests": len(records), "threads": args.threads,
              "seconds_before": round(seconds["before"], 1), "seconds_now": round(seconds["now"], 1),
              "seconds_floor": round(floor, 1), "speedup": round(seconds["before"] / seconds["now"], 2),
              "now_over_floor": round(seconds["now"] / floor, 2), "row_tokens": row_tokens,
              "tokens_run_now": plan.tokens_run, "distinct_prefix_tokens": distinct_prefix_tokens(plan),
              "largest_metric_difference": max(d for _, _, d in differences.values()),
              "metrics": {k: v[0] for k, v in differences.items()}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
