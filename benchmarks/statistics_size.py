"""How the size of the preserved-knowledge statistics changes AlphaEdit's null space, and how well a null space
estimated on some text protects text it never saw.

    python benchmarks/statistics_size.py [--sizes 25000,50000,100000,200000] [--threads 1]

For each size N: C from the first N tokens of WikiText-2 validation (`stats/source=wikitext`, cached as every
run caches it), AlphaEdit's default projector P on it, P's rank, and the share of the key energy P leaves
movable (tr(P C) / tr(C); 0 for an exact null space) on the text P was estimated from and on `--heldout`
tokens of WikiText-2 test, which no statistics of the runs read. SmolLM2-135M, `model.locate_modules`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import ROOT  # noqa: F401  (puts the checkout on sys.path)

import rledit
from rledit.data.text import TextFile
from rledit.editors.nullspace import movable_share, nullspace_projector
from rledit.models.layers import resolve_edit_modules
from rledit.models.statistics import PreservedStatistics
from rledit.threads import cpu_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="25000,50000,100000,200000", help="token counts, comma-separated")
    parser.add_argument("--heldout", type=int, default=100_000, help="tokens of wiki.test.txt (default 100k)")
    parser.add_argument("--threshold", type=float, default=1e-2)
    parser.add_argument("--kind", default="relative")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with cpu_threads(args.threads):
        smol = rledit.load_model("smollm2-135m")
        modules = {name: em.module for name, em in resolve_edit_modules(smol.model, smol.locate_modules).items()}
        estimated = {size: rledit.preserved_statistics("wikitext", num_tokens=size)
                     .second_moments(smol.model, smol.tokenizer, modules) for size in sizes}
        validation = rledit.preserved_statistics("wikitext").source.path
        heldout = PreservedStatistics(TextFile(str(Path(validation).with_name("wiki.test.txt"))),
                                      num_tokens=args.heldout).second_moments(smol.model, smol.tokenizer, modules)
    print(f"AlphaEdit's null space (eigenvalues below {args.threshold}, {args.kind}) from N tokens of "
          f"wiki.valid.txt; movable share tr(P C) / tr(C) on those tokens and on {args.heldout} of wiki.test.txt\n")
    print("| module | tokens | projector rank | movable share, estimated on | movable share, held out |")
    print("|---|---|---|---|---|")
    for name in modules:
        for size in sizes:
            C = estimated[size][name]
            projector, rank = nullspace_projector(name, C, args.threshold, args.kind)
            print(f"| {name} | {size} | {rank} | {movable_share(projector, C):.4f} | "
                  f"{movable_share(projector, heldout[name]):.4f} |")


if __name__ == "__main__":
    main()
