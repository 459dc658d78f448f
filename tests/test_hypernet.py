"""Running normalizer and hypernetworks: exact statistics, identity at init, sharing, training signal, checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch

from rledit.editors.hypernet import HyperNetworkBank
from rledit.editors.normalizer import RunningNormalizer
from rledit.errors import ConfigError, LayerSpecError

DOWN0, DOWN1, UP0 = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"
SHAPES = {DOWN0: (6, 10), DOWN1: (6, 10), UP0: (10, 6)}  # (d_out, d_in)
NETS = ["mend", "ridge"]


def factors(name: str, n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    d_out, d_in = SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen) * 3 + 1, torch.randn(n, d_out, generator=gen) * 1e-3


def make_bank(net: str, **options) -> HyperNetworkBank:
    torch.manual_seed(0)
    return HyperNetworkBank(SHAPES, net=net, rank=3, **{"n_blocks": 2, **options})


# ---- RunningNormalizer -------------------------------------------------------------------------------

def test_batched_merges_equal_statistics_of_the_concatenation():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 5, generator=gen, dtype=torch.float64) * 4 + 2 for n in (1, 9, 0, 2, 31)]
    norm = RunningNormalizer(5)
    for batch in batches:
        norm.observe(batch)
    everything = torch.cat(batches)
    assert int(norm.count) == everything.shape[0]
    torch.testing.assert_close(norm.mean, everything.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.variance(), everything.var(0), rtol=1e-12, atol=1e-12)
    z = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    expected = (z - everything.mean(0)) / (everything.var(0) + norm.eps).sqrt()
    torch.testing.assert_close(norm(z), expected, rtol=1e-12, atol=1e-12)


def test_masked_rows_do_not_enter_the_statistics():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    mask = torch.tensor([True, False] * 6)
    norm = RunningNormalizer(3)
    norm.observe(torch.where(mask[:, None], z, torch.full_like(z, 1e6)), mask)
    norm.observe(z, torch.zeros(12, dtype=torch.bool))  # all padding: no change
    assert int(norm.count) == 6
    torch.testing.assert_close(norm.mean, z[mask].mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.variance(), z[mask].var(0), rtol=1e-12, atol=1e-12)


def test_identity_before_two_rows_and_when_disabled():
    z = torch.randn(4, 3)
    norm = RunningNormalizer(3)
    assert torch.equal(norm(z), z)
    norm.observe(z[:1] + 5)
    assert torch.equal(norm(z), z)
    norm.observe(z)
    assert not torch.allclose(norm(z), z)
    norm.enabled = False
    assert norm(z) is z


def test_normalizer_state_dict_round_trip_keeps_statistics_exact():
    norm = RunningNormalizer(4)
    norm.observe(torch.randn(20, 4) * 7)
    state = norm.state_dict()
    assert {k: v.dtype for k, v in state.items()} == {
        "count": torch.int64, "mean": torch.float64, "m2": torch.float64}
    restored = RunningNormalizer(4)
    restored.load_state_dict(state)
    z = torch.randn(5, 4)
    assert torch.equal(restored(z), norm(z))


def test_normalizer_rejects_wrong_width_and_mask_length():
    norm = RunningNormalizer(4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        norm.observe(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="row mask"):
        norm.observe(torch.zeros(3, 4), torch.ones(2, dtype=torch.bool))


# ---- HyperNetworkBank ---------------------------------------------------------------------------------

@pytest.mark.parametrize("net", NETS)
def test_networks_are_the_identity_at_init_without_normalization(net):
    bank = make_bank(net, normalize=False)
    for name in SHAPES:
        K, G = factors(name)
        K_t, G_t = bank(name, K, G)
        assert torch.equal(K_t, K) and torch.equal(G_t, G)


@pytest.mark.parametrize("net", NETS)
def test_networks_return_the_normalized_input_at_init(net):
    bank = make_bank(net)
    K, G = factors(DOWN0)
    K_t, G_t = bank(DOWN0, K, G)
    z = torch.cat([K, G], 1)
    assert torch.equal(torch.cat([K_t, G_t], 1), bank.normalizers["6x10"](z))
    expected = (z.double() - z.double().mean(0)) / z.double().var(0).sqrt()
    torch.testing.assert_close(torch.cat([K_t, G_t], 1).double(), expected, rtol=1e-5, atol=1e-5)


def test_statistics_update_when_training_or_lifelong_only():
    bank = make_bank("ridge")
    stats = bank.normalizers["6x10"]
    K, G = factors(DOWN0, n=5)
    bank.train()
    bank(DOWN0, K, G)
    assert int(stats.count) == 5
    bank.eval()
    bank(DOWN1, K, G)  # lifelong normalization (the default) keeps observing at test time
    assert int(stats.count) == 10
    stats.update_during_edit = False
    bank(DOWN1, K, G)
    assert int(stats.count) == 10
    assert int(bank.normalizers["10x6"].count) == 0


def test_bank_statistics_ignore_padded_rows():
    bank = make_bank("mend")
    K, G = factors(DOWN0, n=8)
    mask = torch.tensor([True] * 5 + [False] * 3)
    K_padded, G_padded = K.clone(), G.clone()
    K_padded[~mask], G_padded[~mask] = 1e4, -1e4
    bank(DOWN0, K_padded, G_padded, mask=mask)
    stats = bank.normalizers["6x10"]
    z = torch.cat([K, G], 1)[mask].double()
    assert int(stats.count) == 5
    torch.testing.assert_close(stats.mean, z.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.variance(), z.var(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("net", NETS)
def test_same_shape_modules_share_a_network_and_other_shapes_do_not(net):
    bank = make_bank(net, normalize=False)
    assert sorted(bank.nets) == ["10x6", "6x10"]
    inputs = {name: factors(name, seed=3) for name in SHAPES}
    before = {name: torch.cat(bank(name, *inputs[name]), 1).detach() for name in SHAPES}
    K_t, G_t = bank(DOWN0, *inputs[DOWN0])
    (K_t.square().sum() + G_t.square().sum()).backward()
    assert all(p.grad is None for p in bank.nets["10x6"].parameters())
    torch.optim.SGD(bank.parameters(), lr=0.1).step()
    after = {name: torch.cat(bank(name, *inputs[name]), 1).detach() for name in SHAPES}
    assert not torch.equal(after[DOWN1], before[DOWN1])  # DOWN1 reads the network DOWN0 trained
    assert torch.equal(after[UP0], before[UP0])


def train_steps(bank: HyperNetworkBank, names: list[str], steps: int, lr: float = 0.05) -> None:
    """A few Adam steps pulling each module's outputs towards its own random targets."""
    optimizer = torch.optim.Adam(bank.parameters(), lr=lr)
    targets = {name: torch.randn(7, sum(SHAPES[name]), generator=torch.Generator().manual_seed(i))
               for i, name in enumerate(names)}
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum((torch.cat(bank(name, *factors(name)), 1) - targets[name]).square().mean() for name in names)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("net", NETS)
def test_per_module_scale_and_shift_are_learned_separately(net):
    bank = make_bank(net, normalize=False)
    train_steps(bank, [DOWN0, DOWN1], steps=3)
    for block in bank.nets["6x10"].blocks:
        scale, shift = block.affine.scale.detach(), block.affine.shift.detach()
        assert not torch.equal(scale[0], scale[1]) and not torch.equal(shift[0], shift[1])
        assert (scale != 1).any(dim=1).all() and (shift != 0).any(dim=1).all()


@pytest.mark.parametrize("net", NETS)
def test_gradient_reaches_both_lowrank_factors_after_one_step(net):
    bank = make_bank(net, normalize=False, n_blocks=1)
    lowrank = bank.nets["6x10"].blocks[0].lowrank
    A0, B0 = lowrank.A.detach().clone(), lowrank.B.detach().clone()
    optimizer = torch.optim.SGD(bank.parameters(), lr=0.1)
    grads = []
    for _ in range(2):
        optimizer.zero_grad()
        K_t, G_t = bank(DOWN0, *factors(DOWN0))
        (K_t.sum() + 2 * G_t.sum()).backward()
        grads.append((lowrank.A.grad.clone(), lowrank.B.grad.clone()))
        optimizer.step()
    (A_grad_at_init, B_grad_at_init), (A_grad_after, _) = grads
    assert torch.count_nonzero(A_grad_at_init) == 0 and torch.count_nonzero(B_grad_at_init) > 0
    assert torch.count_nonzero(A_grad_after) > 0
    assert not torch.equal(lowrank.A, A0) and not torch.equal(lowrank.B, B0)


@pytest.mark.parametrize("net", NETS)
def test_rebuild_from_shapes_and_state_dict_gives_identical_outputs(net):
    bank = make_bank(net, init_log_eta=-3.0)
    train_steps(bank, [DOWN0, UP0], steps=2)
    bank.calibrate_log_eta(DOWN1, -7.5)
    torch.manual_seed(123)
    reversed_shapes = dict(reversed(SHAPES.items()))  # name order must not matter
    rebuilt = HyperNetworkBank(reversed_shapes, net=net, rank=3, n_blocks=2, init_log_eta=-3.0)
    rebuilt.load_state_dict(bank.state_dict())
    unpickled = pickle.loads(pickle.dumps(bank))

    def outputs(b: HyperNetworkBank) -> list[torch.Tensor]:  # eval: lifelong statistics keep updating
        return [torch.cat(b.eval()(name, *factors(name, seed=9)), 1) for name in SHAPES]

    expected = outputs(bank)
    for copy in (rebuilt, unpickled):
        assert all(torch.equal(a, b) for a, b in zip(outputs(copy), expected))
        assert all(torch.equal(copy.log_eta(name), bank.log_eta(name)) for name in SHAPES)
    assert rebuilt.shape_of(UP0) == (10, 6) and set(rebuilt.names) == set(SHAPES)


def test_log_step_size_and_ridge_are_calibrated_and_carry_gradient():
    bank = make_bank("ridge", init_log_eta=-2.0, init_log_lambda=1.0)
    bank.calibrate_log_eta(DOWN1, -9.0)
    bank.calibrate_log_lambda(UP0, 4.0)
    assert bank.log_eta(DOWN1).item() == -9.0 and bank.log_eta(DOWN0).item() == -2.0
    assert bank.log_lambda(UP0).item() == 4.0 and bank.log_lambda(DOWN1).item() == 1.0
    (bank.log_eta(DOWN1) * 2 + bank.log_lambda(DOWN1)).backward()
    torch.testing.assert_close(bank.nets["6x10"].log_eta.grad, torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(bank.nets["6x10"].log_lambda.grad, torch.tensor([0.0, 1.0]))
    mend = make_bank("mend", init_log_eta=-4.0)
    assert mend.log_eta(UP0).item() == -4.0
    with pytest.raises(ConfigError, match="log_lambda exists only for net='ridge'"):
        mend.log_lambda(UP0)
    with pytest.raises(ConfigError, match="log_lambda exists only for net='ridge'"):
        mend.calibrate_log_lambda(UP0, 1.0)


def test_a_recalibration_keeps_what_training_added_to_the_calibrated_values():
    bank = make_bank("ridge")
    bank.calibrate_log_eta(DOWN1, -9.0)
    bank.calibrate_log_lambda(DOWN1, 4.0)
    with torch.no_grad():  # training moves both away from their calibration
        bank.nets["6x10"].log_eta[1] -= 0.25
        bank.nets["6x10"].log_lambda[1] += 0.5
    bank.calibrate_log_eta(DOWN1, -8.0)
    bank.calibrate_log_lambda(DOWN1, 3.0)
    assert bank.log_eta(DOWN1).item() == -8.25 and bank.log_lambda(DOWN1).item() == 3.5
    rebuilt = make_bank("ridge")
    rebuilt.load_state_dict(bank.state_dict())  # the calibration a checkpoint started from travels with it
    rebuilt.calibrate_log_eta(DOWN1, -7.0)
    assert rebuilt.log_eta(DOWN1).item() == -7.25


def test_bad_configuration_and_inputs_are_named():
    with pytest.raises(ConfigError, match="unknown hypernetwork net='lstm'"):
        HyperNetworkBank(SHAPES, net="lstm")
    with pytest.raises(ConfigError, match=f"module '{UP0}'"):
        HyperNetworkBank({UP0: (10, 0)})
    bank = make_bank("ridge")
    with pytest.raises(LayerSpecError, match="no hypernetwork for module 'lm_head'"):
        bank("lm_head", *factors(UP0))
    K, G = factors(DOWN0)
    with pytest.raises(LayerSpecError, match=rf"module '{DOWN0}': expected keys \(N, 10\)"):
        bank(DOWN0, G, K)
