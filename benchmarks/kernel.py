"""Time the fused low-rank update against the two naive ways of applying a factored update.

    python benchmarks/kernel.py            # full run: 1536x576 and 4096x14336, N = 200 and 2000
    python benchmarks/kernel.py --quick    # 1536x576 only, fewer repeats
    python benchmarks/kernel.py --threads 1  # steadier CPU timings on a machine shared with other jobs

Every row applies ``master += alpha * P^T diag(s) Q; weight <- cast(master)`` three ways:
  fused  rledit's fused_lowrank_update_ (Triton on CUDA, the PyTorch path elsewhere)
  dense  form dW = (P * s)^T Q in fp32, then master += alpha * dW and weight <- cast(master)
  outer  sum N per-token outer products into dW, then add and cast as above. When that loop would
         touch more than --outer-budget weight elements it runs on fewer tokens and is extrapolated
         linearly in N (marked with "~"): fixed cost (zeros, add, cast) + N x measured per-token cost.
Times are medians, all measured in one run, so the ratios compare like with like: fused and dense are
interleaved over about FAST_SECONDS of calls each (at least --repeats, at most MAX_FAST_REPEATS: a 3 ms
call needs hundreds of repeats before load from other processes stops swaying its median), the slow
per-token loop over --repeats calls.
On CUDA it also times Llama-3-8B projection shapes in bf16 and reports achieved TFLOP/s against a plain
bf16 matmul producing a matrix of the same size from the same factors.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from harness import median_seconds, synchronize

from rledit.kernels import fused_lowrank_update_
from rledit.kernels.lowrank import resolve_backend

SHAPES = [(1536, 576), (4096, 14336)]  # (d_in, d_out)
QUICK_SHAPES = [(1536, 576)]
TOKEN_COUNTS = [200, 2000]
WEIGHT_DTYPES = [torch.float32, torch.bfloat16]
# Llama-3-8B projections, (d_in, d_out): q/o, k/v, gate/up, down.
LLAMA3_8B_SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336),
                    "down_proj": (14336, 4096)}
ALPHA = 1e-3  # keeps master bounded over many in-place repeats
FAST_SECONDS = 1.0
MAX_FAST_REPEATS = 200


@dataclass
class Problem:
    """The tensors of one update: master/weight (d_out x d_in) and the factors P, Q, scale."""

    master: torch.Tensor
    weight: torch.Tensor
    P: torch.Tensor
    Q: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def random(cls, d_in: int, d_out: int, n_rows: int, weight_dtype: torch.dtype,
               device: torch.device) -> Problem:
        master = torch.randn(d_out, d_in, device=device)
        return cls(master, master.to(weight_dtype), torch.randn(n_rows, d_out, device=device),
                   torch.randn(n_rows, d_in, device=device), torch.rand(n_rows, device=device))


def fused(p: Problem) -> None:
    fused_lowrank_update_(p.master, p.weight, p.P, p.Q, scale=p.scale, alpha=ALPHA)


def dense(p: Problem) -> None:
    update = (p.P * p.scale[:, None]).T @ p.Q
    p.master.add_(update, alpha=ALPHA)
    p.weight.copy_(p.master)


def outer_products(p: Problem, n_tokens: int) -> None:
    update = torch.zeros_like(p.master)
    for i in range(n_tokens):
        update += torch.outer(p.P[i] * p.scale[i], p.Q[i])
    p.master.add_(update, alpha=ALPHA)
    p.weight.copy_(p.master)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def bytes_needed(d_in: int, d_out: int, n_rows: int) -> int:
    """master + weight + the baselines' dense dW and one temporary of that size, plus the factors, in fp32."""
    return 4 * (4 * d_in * d_out + n_rows * (d_in + d_out + 1))


def comparison_row(d_in: int, d_out: int, n_rows: int, weight_dtype: torch.dtype, repeats: int,
                   outer_budget: int, device: torch.device) -> str:
    """One table row: the three methods timed on the same tensors, and their ratios."""
    label = f"{d_in:>6}x{d_out:<6} {n_rows:>5} {str(weight_dtype).removeprefix('torch.'):>8}"
    needed = bytes_needed(d_in, d_out, n_rows)
    if needed > free_bytes(device):
        return f"{label}  skipped: needs {needed / 2**30:.1f} GiB"
    p = Problem.random(d_in, d_out, n_rows, weight_dtype, device)
    # The per-token loop runs on at most outer_budget weight elements; beyond that it is extrapolated
    # linearly in N from its fixed cost (zeros, add, cast: the loop over 0 tokens) and n_timed tokens.
    n_timed = max(2, min(n_rows, outer_budget // p.master.numel()))
    loops = {"outer": lambda: outer_products(p, n_timed)}
    extrapolated = n_timed < n_rows
    if extrapolated:
        loops["outer_fixed"] = lambda: outer_products(p, 0)
    fast = {"fused": lambda: fused(p), "dense": lambda: dense(p)}
    t = median_seconds(fast, fast_repeats(fast["dense"], repeats, device), device)
    t |= median_seconds(loops, repeats, device)
    t_outer = t["outer"]
    if extrapolated:
        t_outer = t["outer_fixed"] + (t["outer"] - t["outer_fixed"]) * n_rows / n_timed
    outer = f"{'~' if extrapolated else ''}{t_outer * 1e3:.1f}"
    return (f"{label} {t['fused'] * 1e3:>9.2f} {t['dense'] * 1e3:>9.2f} {outer:>10} "
            f"{t['dense'] / t['fused']:>11.2f} {t_outer / t['fused']:>11.1f}")


def fast_repeats(fn: Callable[[], object], repeats: int, device: torch.device) -> int:
    """How many calls of `fn` take about FAST_SECONDS (at least `repeats`, at most MAX_FAST_REPEATS)."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-9)
    return max(repeats, min(MAX_FAST_REPEATS, math.ceil(FAST_SECONDS / once)))


def comparison_table(shapes: list[tuple[int, int]], repeats: int, outer_budget: int,
                     device: torch.device) -> None:
    header = (f"{'d_in x d_out':>13} {'N':>5} {'weight':>8} {'fused ms':>9} {'dense ms':>9} {'outer ms':>10}"
              f" {'dense/fused':>11} {'outer/fused':>11}")
    print(header)
    print("-" * len(header))
    for d_in, d_out in shapes:
        for n_rows in TOKEN_COUNTS:
            for weight_dtype in WEIGHT_DTYPES:
                row = comparison_row(d_in, d_out, n_rows, weight_dtype, repeats, outer_budget, device)
                print(row, flush=True)


def fused_and_matmul_seconds(d_in: int, d_out: int, n_rows: int, repeats: int,
                             device: torch.device) -> tuple[float, float]:
    """Median seconds of the fused update of a bf16 weight, and of a bf16 matmul (d_out x N) @ (N x d_in)
    producing a matrix of the same size from the same factors (the same FLOPs: 2 N d_in d_out)."""
    p = Problem.random(d_in, d_out, n_rows, torch.bfloat16, device)
    p_t, q = p.P.T.contiguous().to(torch.bfloat16), p.Q.to(torch.bfloat16)
    t = median_seconds({"fused": lambda: fused(p), "matmul": lambda: p_t @ q}, repeats, device)
    return t["fused"], t["matmul"]


def llama3_row(name: str, d_in: int, d_out: int, n_rows: int, repeats: int, device: torch.device) -> str:
    """Fused bf16-weight update vs a bf16 matmul of the same FLOPs, as a table row."""
    t_fused, t_matmul = fused_and_matmul_seconds(d_in, d_out, n_rows, repeats, device)
    flops = 2 * n_rows * d_in * d_out
    return (f"{name:>10} {d_in:>6}x{d_out:<6} {n_rows:>5} {t_fused * 1e3:>9.3f}"
            f" {flops / t_fused / 1e12:>13.1f} {t_matmul * 1e3:>9.3f} {flops / t_matmul / 1e12:>14.1f}"
            f" {t_matmul / t_fused:>12.2f}")


def llama3_table(n_rows_list: list[int], repeats: int, device: torch.device) -> None:
    header = (f"{'module':>10} {'d_in x d_out':>13} {'N':>5} {'fused ms':>9} {'fused TFLOP/s':>13}"
              f" {'matmul ms':>9} {'matmul TFLOP/s':>14} {'fused/matmul':>12}")
    print(header)
    print("-" * len(header))
    for name, (d_in, d_out) in LLAMA3_8B_SHAPES.items():
        for n_rows in n_rows_list:
            print(llama3_row(name, d_in, d_out, n_rows, repeats, device), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shape only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 5)")
    parser.add_argument("--outer-budget", type=float, default=None,
                        help="weight elements the per-token loop may touch before it is extrapolated "
                             "(default 5e8 on CPU, 1e11 on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 gives steadier times on a "
                             "machine shared with other jobs")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 5)
    outer_budget = int(args.outer_budget or (1e11 if device.type == "cuda" else 5e8))
    if args.quick:
        outer_budget //= 10
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = resolve_backend("auto", device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, fused backend: {backend}, "
          f"medians of >= {repeats} calls (fused and dense: about {FAST_SECONDS:g} s of calls each, at most "
          f"{MAX_FAST_REPEATS}); '~' = per-token loop extrapolated in N")
    comparison_table(QUICK_SHAPES if args.quick else SHAPES, repeats, outer_budget, device)
    if device.type == "cuda":
        print("\nLlama-3-8B shapes, bf16 weight; matmul = bf16 (d_out x N) @ (N x d_in), the same FLOPs; "
              "fused/matmul = ratio of achieved TFLOP/s")
        llama3_table([200] if args.quick else [200, 2000], repeats, device)


if __name__ == "__main__":
    main()
