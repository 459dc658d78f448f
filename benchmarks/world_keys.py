"""Where the embedded world's model keeps its facts: how a locate-then-edit update written at one key would
reach the same fact asked another way, and other subjects' facts.

`python benchmarks/world_keys.py [--relation occupation] [model overrides, e.g.
model.load.model.intermediate_size=1024]` reads, on the unedited world model, every MLP output projection's
inputs (down_proj keys) for every subject in each of the relation's templates, at the subject's last token
and at the prompt's last token. An update solved against C = E[k k^T] (MEMIT's prior) that moves key k's
output by v moves key k' by (k'^T C^-1 k / k^T C^-1 k) v, so that ratio, the transfer, says where an edit
goes: to the same subject in another template (paraphrase, should be near 1) or to other subjects in the
same template (should be near 0). C is taken over every token of every fact in every template.
"""

from __future__ import annotations

import argparse

import torch
from harness import ROOT  # noqa: F401  (puts the checkout on sys.path)

import rledit
from rledit.data.collate import EditCollator, TokenizedBatch
from rledit.threads import cpu_threads


def transfers(keys: torch.Tensor, paraphrase_keys: torch.Tensor, C: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(mean paraphrase transfer, |transfer| to every other subject's key): row i of each key matrix is subject i."""
    whitened = torch.linalg.solve(C, keys.T).T  # row i: C^-1 k_i
    own = (whitened * keys).sum(1)
    paraphrase = float(((whitened * paraphrase_keys).sum(1) / own).mean())
    cross = (keys @ whitened.T) / own[None, :]  # [j, i]: key j's share of the update written at key i
    return paraphrase, cross[~torch.eye(len(keys), dtype=torch.bool)].abs()


def down_proj_inputs(model, rows: TokenizedBatch) -> dict[int, torch.Tensor]:
    """Each layer's down_proj inputs (B x T x d) over `rows`."""
    inputs: dict[int, torch.Tensor] = {}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach().double()))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=rows.input_ids, attention_mask=rows.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relation", default="occupation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/model/tiny.yaml")
    args = parser.parse_args()
    with cpu_threads(args.threads):
        tiny = rledit.load_model("tiny", *args.overrides)
        model, tokenizer, world = tiny.model, tiny.tokenizer, tiny.loaded.world
        layers = range(len(model.model.layers))
        collate = EditCollator(tokenizer)
        facts = world.prompts_and_objects()
        sums, count = {i: 0.0 for i in layers}, 0
        for start in range(0, len(facts), 512):
            chunk = facts[start:start + 512]
            batch = collate.rows([prompt for prompt, _, _ in chunk], [f" {answer}" for _, answer, _ in chunk])
            inputs, mask = down_proj_inputs(model, batch), batch.attention_mask.bool()
            for i in layers:
                sums[i] = sums[i] + inputs[i][mask].T @ inputs[i][mask]
            count += int(mask.sum())
        C = {i: sums[i] / count for i in layers}
        relation = world.relation(args.relation)
        subjects = list(world.subjects)
        answers = [f" {world.true_object(s, relation.name)}" for s in subjects]
        per_template = []
        for template in relation.templates[:2]:
            # the positions the locate-then-edit editors read: key_token=subject and key_token=prompt
            batch = collate.rows([relation.render(template, s) for s in subjects], answers, subjects)
            per_template.append((down_proj_inputs(model, batch),
                                 {"subject": batch.subject_last, "prompt": batch.target_mask.int().argmax(-1)}))
    rows = torch.arange(len(subjects))
    print(f"relation {args.relation}, templates {relation.templates[:2]}, {len(subjects)} subjects, "
          f"C over {count} tokens; model overrides: {args.overrides or 'none'}\n")
    print("| layer | key token | paraphrase transfer | other subjects: mean abs transfer | 99th percentile |")
    print("|---|---|---|---|---|")
    for i in layers:
        for token in ("subject", "prompt"):
            keys, paraphrase_keys = (found[i][rows, positions[token]] for found, positions in per_template)
            paraphrase, others = transfers(keys, paraphrase_keys, C[i])
            print(f"| {i} | {token} | {paraphrase:.3f} | {float(others.mean()):.3f} | {float(others.quantile(0.99)):.3f} |")


if __name__ == "__main__":
    main()
