"""How much room AlphaEdit's null space leaves for a growing sequence of edits.

`python benchmarks/nullspace_capacity.py [--steps 50 --edits-per-step 20 --source wikitext]` takes the
requests of the lifelong run `evaluate.py experiment=smollm2-cf-locate-1000/alphaedit` edits, in the same
order, reads each one's key (the input of every `down_proj` of `model.locate_modules` at the subject's last
token, on the unedited model), projects it onto the null space of the preserved-knowledge statistics
(AlphaEdit's default threshold), and prints, after every 100 edits, how much of the newest 100 projected
keys lies outside the span of all earlier ones (1: a new direction, free to write; 0: only directions
earlier edits already wrote), and how many directions the projected keys span so far. Where new keys
have no direction of their own left, an edit can only be written by moving what earlier edits wrote.
"""

from __future__ import annotations

import argparse

import torch
from harness import ROOT  # noqa: F401  (puts the checkout on sys.path)

import rledit
from rledit.data.collate import EditCollator
from rledit.data.streams import EditStream
from rledit.editors.nullspace import movable_share, nullspace_projector
from rledit.models.layers import resolve_edit_modules
from rledit.threads import cpu_threads


def subject_keys(model, tokenizer, modules, records, batch_size: int = 50) -> dict[str, torch.Tensor]:
    """Each module's input at each record's subject's last token (N x d_in), in record order."""
    keys = {name: [] for name in modules}
    collator = EditCollator(tokenizer)
    for start in range(0, len(records), batch_size):
        batch = collator(records[start:start + batch_size]).edit
        rows = torch.arange(batch.num_rows)
        seen: dict[str, torch.Tensor] = {}
        handles = [module.register_forward_hook(lambda _m, args, _o, name=name, seen=seen: seen.update({name: args[0]}))
                   for name, module in modules.items()]
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        for handle in handles:
            handle.remove()
        for name in modules:
            keys[name].append(seen[name][rows, batch.subject_last].double())
    return {name: torch.cat(parts) for name, parts in keys.items()}


def capacity(projected: torch.Tensor, every: int) -> list[tuple[int, float, int]]:
    """(edits so far, mean share of the newest `every` keys' norm outside the earlier keys' span, span rank)."""
    rows = []
    for end in range(every, projected.shape[0] + 1, every):
        earlier, newest = projected[:end - every], projected[end - every:end]
        if earlier.shape[0]:
            basis = torch.linalg.svd(earlier, full_matrices=False)
            scale = basis.S.max()
            span = basis.Vh[basis.S > 1e-6 * scale]
            outside = newest - (newest @ span.T) @ span
        else:
            outside = newest
        share = float((outside.norm(dim=1) / newest.norm(dim=1).clamp_min(1e-30)).mean())
        rank = int(torch.linalg.matrix_rank(projected[:end], rtol=1e-6))
        rows.append((end, share, rank))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--edits-per-step", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default="wikitext", help="stats/source of the statistics")
    parser.add_argument("--threshold", type=float, default=1e-2)
    parser.add_argument("--kind", default="relative")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default="counterfact",
                        help="counterfact (the evaluation requests) or counterfact-validation (to choose layers)")
    parser.add_argument("--layers", default=None, help="model.locate_modules, e.g. 'model.layers.{3-12}.mlp.down_proj'")
    args = parser.parse_args()
    with cpu_threads(args.threads):
        smol = rledit.load_model("smollm2-135m", *([f"model.locate_modules=['{args.layers}']"] if args.layers else []))
        data = rledit.load_data(args.data, smol)
        records = [r for step in EditStream(data.eval, args.steps, args.edits_per_step, args.seed).steps for r in step]
        modules = {name: em.module for name, em in resolve_edit_modules(smol.model, smol.locate_modules).items()}
        moments = rledit.preserved_statistics(args.source).second_moments(smol.model, smol.tokenizer, modules)
        keys = subject_keys(smol.model, smol.tokenizer, modules, records)
    print(f"{len(records)} {args.data} edits in the order of a {args.steps} x {args.edits_per_step} run "
          f"(seed {args.seed}); statistics: {args.source}; null space: eigenvalues below {args.threshold} "
          f"({args.kind})\n")
    print("| module | projector rank | " + " | ".join(f"{n} edits" for n in range(args.every, len(records) + 1,
                                                                               args.every)) + " |")
    print("|---|---|" + "---|" * (len(records) // args.every))
    projectors = {name: nullspace_projector(name, C, args.threshold, args.kind) for name, C in moments.items()}
    for name, (projector, rank) in projectors.items():
        rows = capacity(keys[name] @ projector, args.every)
        cells = " | ".join(f"{share:.2f} ({span})" for _, share, span in rows)
        print(f"| {name} | {rank} | {cells} |")
    print("\ncells: mean share of the newest keys' projected norm outside the span of all earlier projected "
          "keys (the span's dimension so far)")
    print("\nThe scale of AlphaEdit's ridge (`ridge` x the mean eigenvalue of C) against the edits' keys:\n")
    print("| module | mean eigenvalue of C | largest | mean squared key norm | projected | key / mean eigenvalue "
          "| preserved energy in the null space |")
    print("|---|---|---|---|---|---|---|")
    for name, C in moments.items():
        eigenvalues = torch.linalg.eigvalsh(C.double())
        projector = projectors[name][0]
        energy = keys[name].square().sum(1).mean()
        projected = (keys[name] @ projector).square().sum(1).mean()
        leak = movable_share(projector, C)
        print(f"| {name} | {eigenvalues.mean():.4g} | {eigenvalues.max():.4g} | {energy:.4g} | {projected:.4g} | "
              f"{energy / eigenvalues.mean():.0f} | {leak:.4f} |")


if __name__ == "__main__":
    main()
