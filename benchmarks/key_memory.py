"""Seconds of the key memory's work in one multi-round edit step: the running Gram of the pending rounds
against recomputing the Gram of all of them every round (what KeyMemory did before; quadratic in rounds).

    python benchmarks/key_memory.py --threads 1    # SmolLM2-135M's down_proj (1,536 inputs), 5 modules,
                                                   # 12 rounds, one key per request of a 20-request batch

Both are timed on the same keys, interleaved, over `--repeats` steps that each commit onto the last; the
regularisers they hand the solve are compared, and the table holds medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rledit.editors.key_memory import KeyMemory


class RecomputingKeyMemory(KeyMemory):
    """The earlier regulariser: the Gram of every pending round's keys, recomputed in each round."""

    def regulariser(self, name: str) -> torch.Tensor | None:
        gram = self.gram.get(name)
        if name in self.pending:
            gram = (0 if gram is None else gram) + self._weighted_gram(self.pending[name])
        return gram


def edit_step(memory: KeyMemory, keys: list[list[torch.Tensor]]) -> tuple[float, list[torch.Tensor]]:
    """One step's rounds (each module's regulariser, then its keys), committed; seconds and the last round's
    regularisers."""
    start = time.perf_counter()
    for round_keys in keys:
        regularisers = []
        for name, module_keys in enumerate(round_keys):
            regularisers.append(memory.regulariser(str(name)))
            memory.propose(str(name), module_keys)
    memory.commit()
    return time.perf_counter() - start, regularisers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=1536)
    parser.add_argument("--modules", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--keys", type=int, default=20, help="keys per module and round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    running, recomputing = KeyMemory(1.0), RecomputingKeyMemory(1.0)
    seconds: dict[str, list[float]] = {"running": [], "recomputing": []}
    for _ in range(args.repeats):
        keys = [[torch.randn(args.keys, args.d_in, generator=generator) for _ in range(args.modules)]
                for _ in range(args.rounds)]
        t_running, new = edit_step(running, keys)
        t_recomputing, old = edit_step(recomputing, keys)
        for a, b in zip(new, old):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
        seconds["running"].append(t_running)
        seconds["recomputing"].append(t_recomputing)
    running_s, recomputing_s = (statistics.median(seconds[k]) for k in ("running", "recomputing"))
    print(f"{args.modules} modules x {args.d_in} inputs, {args.rounds} rounds of {args.keys} keys, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats} steps")
    print("| key memory | s per step |\n|---|---|")
    print(f"| running Gram of the pending rounds | {running_s:.3f} |")
    print(f"| Gram of all pending keys recomputed each round | {recomputing_s:.3f} |")
    print(f"ratio {recomputing_s / running_s:.2f}")


if __name__ == "__main__":
    main()
