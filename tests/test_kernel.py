"""The fused low-rank update against a float64 reference, on the PyTorch path and the Triton kernel.

The Triton kernel runs on CPU under the Triton interpreter. Triton reads ``TRITON_INTERPRET`` when a
function is decorated with ``@triton.jit``, and its own standard library (``tl.zeros`` ...) is
decorated when ``triton`` is imported, so the variable must be set before that import. The
interpreter checks therefore run in one child Python with the variable set (``interpreter_results``);
this process and the rest of the test session never see it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rledit.errors import ConfigError, KernelInputError, RleditError
from rledit.kernels import fused_lowrank_update_

try:
    from rledit.kernels import triton_lowrank
    from rledit.kernels.triton_lowrank import BLOCK_K, BLOCK_M, BLOCK_N
except ImportError:  # no triton: the PyTorch-path tests still run on the same shapes
    triton_lowrank = None
    BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """One random problem: shapes, which optional inputs are given, and the memory layouts."""

    d_out: int
    d_in: int
    n_rows: int
    weight_dtype: torch.dtype | None  # None: update master only
    with_scale: bool = False
    with_mask: bool = False
    layout: str = "contiguous"  # one of LAYOUTS
    factor_dtype: torch.dtype = torch.float32
    alpha: float = 1.0


LAYOUTS = ("contiguous", "transposed", "sliced")  # transposed: GPT-2 Conv1D; sliced: general strides


def random_cases(count: int, seed: int) -> list[Case]:
    """Shapes and options drawn at random (seeded, so a failure reproduces), up to three blocks per side."""
    rng = random.Random(seed)
    return [Case(rng.randint(1, 3 * BLOCK_M), rng.randint(1, 3 * BLOCK_N), rng.randint(1, 3 * BLOCK_K),
                 rng.choice([torch.float32, torch.bfloat16, torch.float16, None]),
                 with_scale=rng.random() < 0.5, with_mask=rng.random() < 0.5, layout=rng.choice(LAYOUTS),
                 factor_dtype=rng.choice([torch.float32, torch.bfloat16]), alpha=rng.uniform(-2.0, 2.0))
            for _ in range(count)]


CASES = [
    Case(37, 70, 1, torch.float32),  # N=1, no size a multiple of a block
    Case(BLOCK_M, BLOCK_N, BLOCK_K, torch.bfloat16, with_scale=True),  # exact multiples
    Case(2 * BLOCK_M + 3, BLOCK_N + 7, BLOCK_K + 13, torch.bfloat16, with_scale=True, with_mask=True,
         layout="transposed", alpha=-0.5),  # several tiles and a partial BLOCK_K chunk
    Case(20, 150, 2 * BLOCK_K + 6, torch.float16, with_mask=True, layout="sliced"),
    Case(45, 33, 9, None, with_scale=True, with_mask=True, layout="transposed"),
    Case(50, 66, 17, torch.float32, with_scale=True, layout="sliced", factor_dtype=torch.bfloat16,
         alpha=0.25),
    *random_cases(4, seed=2024),
]
CASE_IDS = [repr(case) for case in CASES]


def strided_matrix(rows: int, cols: int, dtype: torch.dtype, layout: str, gen: torch.Generator,
                   device: str) -> torch.Tensor:
    """A rows x cols tensor whose memory layout is the one asked for (values are random)."""
    if layout == "contiguous":
        return torch.randn(rows, cols, generator=gen).to(device, dtype)
    if layout == "transposed":
        return torch.randn(cols, rows, generator=gen).to(device, dtype).T
    base = torch.randn(2 * rows + 1, cols + 5, generator=gen).to(device, dtype)
    return base[1::2, 3:cols + 3]


def make_problem(case: Case, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor | float | None]:
    gen = torch.Generator().manual_seed(seed)
    master = strided_matrix(case.d_out, case.d_in, torch.float32, case.layout, gen, device)
    weight = None
    if case.weight_dtype is not None:
        weight = strided_matrix(case.d_out, case.d_in, case.weight_dtype, case.layout, gen, device)
        weight.copy_(master)
    # P is handed over transposed too, so the kernel's factor strides are exercised as well.
    P = torch.randn(case.d_out, case.n_rows, generator=gen).to(device, case.factor_dtype).T
    Q = torch.randn(case.n_rows, case.d_in, generator=gen).to(device, case.factor_dtype) / case.n_rows ** 0.5
    scale = (torch.rand(case.n_rows, generator=gen) + 0.5).to(device) if case.with_scale else None
    row_mask = None
    if case.with_mask:
        row_mask = (torch.rand(case.n_rows, generator=gen) < 0.7).to(device)
        row_mask[0] = True
        # Padded rows may hold anything: NaN proves that they are skipped, not multiplied by zero.
        P[~row_mask] = float("nan")
        Q[~row_mask] = float("inf")
    return {"master": master, "weight": weight, "P": P, "Q": Q, "scale": scale, "alpha": case.alpha,
            "row_mask": row_mask}


def reference_master(problem: dict) -> torch.Tensor:
    """master + alpha * P^T diag(scale) Q in float64, over the kept rows only."""
    P, Q = problem["P"].double(), problem["Q"].double()
    if problem["row_mask"] is not None:
        keep = problem["row_mask"]
        P, Q = P[keep], Q[keep]
        scale = problem["scale"][keep] if problem["scale"] is not None else None
    else:
        scale = problem["scale"]
    if scale is not None:
        P = P * scale.double()[:, None]
    return problem["master"].double() + problem["alpha"] * (P.T @ Q)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@dataclass(frozen=True)
class Errors:
    """How far one run of the op lands from the float64 reference (computed wherever the op ran)."""

    master: float
    update: float  # the change of master against the reference update: not hidden by a large master
    weight: float | None  # relative to the reference cast to the weight's dtype
    weight_is_cast_of_master: bool  # within one unit in the last place


def measure(case: Case, backend: str, device: str = "cpu") -> Errors:
    problem = make_problem(case, device)
    expected = reference_master(problem)
    before = problem["master"].double()
    fused_lowrank_update_(**problem, backend=backend)
    master, weight = problem["master"], problem["weight"]
    master_errors = (relative_error(master, expected),
                     relative_error(master.double() - before, expected - before))
    if weight is None:
        return Errors(*master_errors, None, True)
    # The Triton interpreter casts fp32 -> bf16 by truncation (CUDA and torch round to nearest even),
    # so the weight may sit one unit in the last place away from torch's cast of master.
    finfo = torch.finfo(weight.dtype)
    ulp = finfo.eps * master.double().abs() + finfo.tiny
    within_ulp = bool(((weight.double() - master.double()).abs() <= ulp).all())
    weight_error = relative_error(weight, expected.to(weight.dtype))
    return Errors(*master_errors, weight_error, within_ulp)


def assert_close_to_reference(case: Case, errors: Errors) -> None:
    assert errors.master < 1e-5
    assert errors.update < 1e-5
    if case.weight_dtype is not None:
        assert errors.weight < (1e-5 if case.weight_dtype == torch.float32 else 1e-2)
        assert errors.weight_is_cast_of_master


@pytest.fixture(scope="module")
def interpreter_results() -> list[Errors]:
    """Run every case through the Triton kernel in a child Python started with TRITON_INTERPRET=1."""
    if triton_lowrank is None:
        pytest.skip("triton is not installed")
    child = ("import dataclasses, json, runpy, sys; tests = runpy.run_path(sys.argv[1]); "
             "errors = [tests['measure'](case, 'triton') for case in tests['CASES']]; "
             "print(json.dumps([dataclasses.asdict(e) for e in errors]))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", child, __file__], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return [Errors(**errors) for errors in json.loads(done.stdout.strip().splitlines()[-1])]


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_torch_path_matches_float64_reference(index: int) -> None:
    assert_close_to_reference(CASES[index], measure(CASES[index], "torch"))


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_triton_kernel_matches_float64_reference(index: int, interpreter_results: list[Errors]) -> None:
    assert_close_to_reference(CASES[index], interpreter_results[index])


@pytest.mark.skipif(triton_lowrank is None or not torch.cuda.is_available(), reason="needs CUDA and triton")
@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_triton_kernel_on_cuda_matches_float64_reference(index: int) -> None:
    assert_close_to_reference(CASES[index], measure(CASES[index], "triton", device="cuda"))


def test_torch_path_weight_is_exact_cast_of_master() -> None:
    problem = make_problem(CASES[2])
    fused_lowrank_update_(**problem, backend="torch")
    assert torch.equal(problem["weight"], problem["master"].to(problem["weight"].dtype))


def test_auto_backend_uses_torch_path_for_cpu_tensors() -> None:
    auto, torch_path = make_problem(CASES[2]), make_problem(CASES[2])
    fused_lowrank_update_(**auto, backend="auto")
    fused_lowrank_update_(**torch_path, backend="torch")
    assert torch.equal(auto["master"], torch_path["master"])
    assert torch.equal(auto["weight"], torch_path["weight"])


def test_triton_backend_on_cpu_without_interpreter_is_refused() -> None:
    if triton_lowrank is None or triton_lowrank.is_interpreted():
        pytest.skip("needs triton imported without TRITON_INTERPRET")
    problem = make_problem(CASES[0])
    before = problem["master"].clone()
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        fused_lowrank_update_(**problem, backend="triton")
    assert torch.equal(problem["master"], before)


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'cuda'.*auto, triton, torch"):
        fused_lowrank_update_(**make_problem(CASES[0]), backend="cuda")


BAD_INPUTS = {
    "master fp16": ("master", lambda p: p["master"].half()),
    "master 1-D": ("master", lambda p: p["master"][0]),
    "weight shape": ("weight", lambda p: p["weight"][:-1]),
    "weight int": ("weight", lambda p: p["weight"].to(torch.int32)),
    "P d_out": ("P", lambda p: p["P"][:, :-1]),
    "P not a tensor": ("P", lambda p: p["P"].tolist()),
    "Q rows": ("Q", lambda p: p["Q"][:-1]),
    "Q float64": ("Q", lambda p: p["Q"].double()),
    "scale length": ("scale", lambda p: torch.ones(p["P"].shape[0] + 1)),
    "scale 2-D": ("scale", lambda p: torch.ones(p["P"].shape[0], 1)),
    "row_mask float": ("row_mask", lambda p: torch.ones(p["P"].shape[0])),
    "row_mask length": ("row_mask", lambda p: torch.ones(p["P"].shape[0] - 1, dtype=torch.bool)),
}


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=str)
def test_bad_inputs_raise_naming_the_tensor(bad: str) -> None:
    name, spoiled = BAD_INPUTS[bad]
    problem = make_problem(CASES[2])
    problem[name] = spoiled(problem)
    master_before = problem["master"].clone()
    with pytest.raises(KernelInputError, match=rf"^{name} ") as raised:
        fused_lowrank_update_(**problem, backend="torch")
    assert isinstance(raised.value, RleditError) and isinstance(raised.value, ValueError)
    if name != "master":
        assert torch.equal(problem["master"], master_before)
