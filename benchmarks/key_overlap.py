"""Why a null space built from generic text cannot keep target-token edits off the neighbourhood prompts.

`python benchmarks/key_overlap.py [--requests 60 --module model.layers.18.mlp.gate_proj]` reads, on the
unedited SmolLM2-135M, the keys (the module's inputs) a ridge editor captures for CounterFact-val edits:
at the target tokens of the edit prompts (`capture_tokens=target`) and at the subject's last token
(`subject`), and the same module's inputs at the answer tokens of each request's neighbourhood prompts
(what the agreement metric scores). It prints how close each kind of edit key is to the neighbourhood
keys (mean cosine of each neighbourhood key to the nearest edit key of its own request), and how much of
each kind's norm the null-space projectors keep (the share a projected edit can still write, and the share
of the neighbourhood keys it would then still move).
"""

from __future__ import annotations

import argparse

import torch
from harness import ROOT  # noqa: F401  (puts the checkout on sys.path)

import rledit
from rledit.data.collate import EditCollator, TokenizedBatch
from rledit.data.streams import EditStream
from rledit.editors.nullspace import nullspace_projector
from rledit.threads import cpu_threads


def module_inputs(model, module, rows: TokenizedBatch, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's inputs at the positions of `mask` (B x T) and the row of each."""
    seen: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda _m, args, _o: seen.update(inputs=args[0]))
    with torch.no_grad():
        model(input_ids=rows.input_ids, attention_mask=rows.attention_mask)
    handle.remove()
    return seen["inputs"][mask].double(), mask.nonzero()[:, 0]


def nearest_cosine(queries: torch.Tensor, query_requests: torch.Tensor, keys: torch.Tensor,
                   key_requests: torch.Tensor) -> float:
    """Mean over `queries` of the largest cosine to a key of the same request."""
    cos = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
    same = query_requests[:, None] == key_requests[None, :]
    return float(cos.masked_fill(~same, -2.0).max(dim=1).values.mean())


def kept_share(keys: torch.Tensor, projector: torch.Tensor) -> float:
    """Mean share of the keys' norm inside the projector's range."""
    return float(((keys @ projector).norm(dim=1) / keys.norm(dim=1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--module", default="model.layers.18.mlp.gate_proj")
    parser.add_argument("--source", default="wikitext")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with cpu_threads(args.threads):
        smol = rledit.load_model("smollm2-135m")
        data = rledit.load_data("counterfact", smol)
        records = EditStream(data.eval, 1, args.requests, seed=0).steps[0]
        batch = EditCollator(smol.tokenizer)(records)
        module = smol.model.get_submodule(args.module)
        C = rledit.preserved_statistics(args.source).second_moments(smol.model, smol.tokenizer,
                                                                    {args.module: module})[args.module]
        subject_mask = torch.zeros_like(batch.edit.target_mask)
        subject_mask[torch.arange(batch.edit.num_rows), batch.edit.subject_last] = True
        target, target_req = module_inputs(smol.model, module, batch.edit, batch.edit.target_mask)
        subject, subject_req = module_inputs(smol.model, module, batch.edit, subject_mask)
        neighbours, neighbour_rows = module_inputs(smol.model, module, batch.locality, batch.locality.target_mask)
    neighbour_req = batch.locality.request_index[neighbour_rows]
    generic = torch.linalg.eigh(C.double())
    print(f"{args.requests} CounterFact-val requests, module {args.module}, statistics {args.source}\n")
    print("| edit keys at | cosine of neighbourhood keys to the nearest edit key of their request | "
          "norm kept by the relative 1e-2 null space: edit keys / neighbourhood keys | the same for 1% energy |")
    print("|---|---|---|---|")
    relative, rank_relative = nullspace_projector(args.module, C, 1e-2, "relative")
    energy, rank_energy = nullspace_projector(args.module, C, 1e-2, "energy")
    for label, keys, requests in (("target tokens", target, target_req), ("subject's last token", subject, subject_req)):
        print(f"| {label} | {nearest_cosine(neighbours, neighbour_req, keys, requests):.3f} | "
              f"{kept_share(keys, relative):.3f} / {kept_share(neighbours, relative):.3f} | "
              f"{kept_share(keys, energy):.3f} / {kept_share(neighbours, energy):.3f} |")
    print(f"\nprojector ranks: relative {rank_relative}, energy {rank_energy} of {C.shape[0]}; largest eigenvalue of C "
          f"{float(generic.eigenvalues[-1]):.3g}, median {float(generic.eigenvalues.median()):.3g}")


if __name__ == "__main__":
    main()
