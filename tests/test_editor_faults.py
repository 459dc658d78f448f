"""Non-finite inputs inside an editor: the ridge solve and the step-size calibration refuse them at once
(EditRefusedError naming what was non-finite), and the lifelong normalizer leaves such rows out of its
statistics. A finite system that is not positive definite still raises LinAlgError.
"""

from __future__ import annotations

import pytest
import torch

from rledit.editors.mend import MendEditor
from rledit.editors.normalizer import RunningNormalizer
from rledit.editors.ridge_solve import ridge_update
from rledit.editors.training_free import TrainingFreeEditor
from rledit.errors import EditRefusedError
from rledit.models.capture import CapturedFactors

N, D_IN, D_OUT = 5, 6, 4


def ridge_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"keys": torch.randn(N, D_IN, generator=g), "value_shifts": torch.randn(N, D_OUT, generator=g),
            "ridge": torch.tensor(0.1), "memory": torch.eye(D_IN)}


@pytest.fixture
def cholesky_calls(monkeypatch) -> list[int]:
    """Counts the Cholesky factorisations the ridge solve attempts."""
    calls, cholesky_ex = [], torch.linalg.cholesky_ex

    def counted(A, *args, **kwargs):
        calls.append(1)
        return cholesky_ex(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counted)
    return calls


LABELS = {"keys": "keys", "value_shifts": "value shifts", "ridge": "ridge", "memory": "key memory"}
RIDGE_CASES = [(form, field) for form in ("dual", "primal", "memory") for field in LABELS
               if field != "memory" or form == "memory"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("form, field", RIDGE_CASES)
def test_non_finite_ridge_inputs_are_refused_before_any_factorisation(cholesky_calls, form, field, bad):
    inputs = ridge_inputs()
    inputs[field] = inputs[field].clone()
    inputs[field].view(-1)[0] = bad
    memory = inputs.pop("memory")
    with pytest.raises(EditRefusedError, match=f"ridge solve refused: non-finite {LABELS[field]}$"):
        if form == "memory":
            ridge_update(**inputs, memory=memory)
        else:
            ridge_update(**inputs, form=form)
    assert cholesky_calls == []


def test_a_ridge_system_that_overflows_from_finite_keys_is_refused(cholesky_calls):
    inputs = ridge_inputs()
    inputs.pop("memory")
    inputs["keys"] = inputs["keys"] * 1e20  # finite in fp32, but K K^T is not
    with pytest.raises(EditRefusedError, match="non-finite system matrix"):
        ridge_update(**inputs, form="dual")
    assert cholesky_calls == []


def test_a_finite_system_that_is_not_positive_definite_still_raises_linalg_error(cholesky_calls):
    keys, shifts = torch.zeros(N, D_IN), torch.ones(N, D_OUT)
    with pytest.raises(torch.linalg.LinAlgError) as raised:
        ridge_update(keys, shifts, torch.tensor(-1.0), form="dual")  # A = -I: no jitter makes it definite
    assert raised.type is torch.linalg.LinAlgError
    assert len(cholesky_calls) == 6


def factors(seed: int, *, key_nan: bool = False, output_norm: float | None = None) -> CapturedFactors:
    g = torch.Generator().manual_seed(seed)
    f = CapturedFactors(torch.randn(N, D_IN, generator=g), torch.randn(N, D_OUT, generator=g),
                        torch.rand(N, generator=g) + 0.5)
    if key_nan:
        f.keys[2, 1] = float("nan")
    if output_norm is not None:
        f.output_norms.fill_(output_norm)
    return f


EDITORS = {"mend": lambda shapes: MendEditor(shapes, rank=2, normalize=False),
           "training_free": lambda shapes: TrainingFreeEditor(shapes, normalize=False)}
SHAPES = {"first": (D_OUT, D_IN), "second": (D_OUT, D_IN)}


@pytest.mark.parametrize("editor_kind", EDITORS)
@pytest.mark.parametrize("fault, message", [
    ({"key_nan": True}, "module 'second': step size calibration refused: non-finite keys, transformed keys"),
    ({"output_norm": 0.0}, "module 'second': step size calibration refused: the step size came out 0.0"),
], ids=["non-finite keys", "zero step"])
def test_an_unusable_calibration_batch_is_refused_and_the_next_batch_calibrates(editor_kind, fault, message):
    editor = EDITORS[editor_kind](SHAPES)
    initial_eta = editor.bank.log_eta("second").clone()
    poisoned = {"first": factors(1), "second": factors(2, **fault)}  # "first" calibrates before "second" fails
    with pytest.raises(EditRefusedError, match=message):
        editor.update_from_factors(poisoned)
    assert not bool(editor.calibrated)
    assert torch.equal(editor.bank.log_eta("second"), initial_eta)

    clean = {"first": factors(3), "second": factors(4)}
    editor.update_from_factors(clean)
    reference = EDITORS[editor_kind](SHAPES)
    reference.update_from_factors(clean)
    assert bool(editor.calibrated)
    for name in SHAPES:  # calibrated from the clean batch alone, as if the refused one had never come
        assert torch.isfinite(editor.bank.log_eta(name))
        assert torch.equal(editor.bank.log_eta(name), reference.bank.log_eta(name))


def test_non_finite_rows_stay_out_of_the_normalizer_statistics():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(10, 3, generator=g, dtype=torch.float64) * 3 + 1
    z[2, 0], z[5, 2], z[7, 1] = float("nan"), float("inf"), -float("inf")
    mask = torch.ones(10, dtype=torch.bool)
    mask[8] = False
    finite = torch.isfinite(z).all(dim=1)

    norm, reference = RunningNormalizer(3), RunningNormalizer(3)
    norm.observe(z, mask)
    reference.observe(z[finite & mask])
    assert int(norm.count) == int(reference.count) == 6
    torch.testing.assert_close(norm.mean, reference.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(norm.m2, reference.m2, rtol=1e-12, atol=0)


def test_a_batch_of_only_non_finite_rows_leaves_the_normalizer_statistics_unchanged():
    norm = RunningNormalizer(3)
    norm.observe(torch.randn(4, 3, generator=torch.Generator().manual_seed(6)))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    norm.observe(torch.tensor([[float("nan"), 0.0, 1.0], [2.0, float("inf"), 3.0]]))
    assert all(torch.equal(v, before[k]) for k, v in norm.state_dict().items())


@pytest.mark.parametrize("init_ridge", [1e308, 0.0])
def test_a_ridge_that_is_not_positive_and_finite_is_refused(init_ridge):
    editor = TrainingFreeEditor(SHAPES, normalize=False, init_ridge=init_ridge)
    with pytest.raises(EditRefusedError, match="module 'first': ridge calibration refused"):
        editor.update_from_factors({"first": factors(1), "second": factors(2)})
    assert not bool(editor.calibrated)
