"""train_step: estimators through the branch machinery, branch semantics, accounting, faults."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx
from qzo_fx.train.graphs import BranchGraphs
from qzo_fx.train.rng import RngState
from qzo_fx.train.strategies import AUTO_ROUNDS, Branches, StrategyContext, build
from qzo_fx.train.workspace import Workspace

STRATEGIES = ("inplace", "sequential", "batched")


class DropNet(nn.Module):
    """Linear, BatchNorm and dropout: every branch-semantics rule matters here."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn = nn.Linear(12, 16), nn.BatchNorm1d(16)
        self.drop, self.fc2 = nn.Dropout(0.3), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture
def setup():
    torch.manual_seed(0)
    qm = qzo_fx.prepare(DropNet(), qzo_fx.QuantConfig(weight_bits=2))
    qm.train()
    batch = (torch.randn(32, 12), torch.randint(0, 4, (32,)))
    return qm, batch


class Runner:
    """One strategy on explicit branches (the tests' view of what a step's estimator asks)."""

    def __init__(self, qm, loss_fn, names, strategy):
        ctx = StrategyContext(qm, loss_fn, names, Workspace())
        self.strategy = build(strategy, ctx, BranchGraphs(qm, names).getter)

    def losses(self, deltas, batch, rng):
        """``deltas``: a list of (tensors, sign); each branch is theta + sign * tensors."""
        branches = Branches([(k, sign) for k, (_, sign) in enumerate(deltas)], lambda k, i: deltas[k][0][i], None,
                            lambda: [d for d, _ in deltas])
        return self.strategy.losses(branches, batch, rng)


def _branches(qm, names, scale=0.05, k=4):
    g = torch.Generator().manual_seed(1)
    return [([torch.randn(qm.get_parameter(n).shape, generator=g) * scale for n in names], s)
            for s in (1.0, -1.0) for _ in range(k // 2)]


def test_strategies_agree_and_inplace_restores_bit_exactly(setup):
    qm, batch = setup
    names = ["fc1.weight", "fc2.weight"]
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    branches = _branches(qm, names)
    rng = RngState.capture()
    losses = {s: Runner(qm, ce, names, s).losses(branches, batch, rng) for s in STRATEGIES}
    torch.testing.assert_close(losses["inplace"], losses["sequential"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["batched"], losses["sequential"], rtol=1e-5, atol=1e-6)
    for key, value in qm.state_dict().items():
        assert torch.equal(value, before[key]), key  # parameters and BatchNorm statistics


def test_branches_leave_functional_batchnorm_statistics_alone():
    # torch.export leaves BatchNorm as functional ops that update the running statistics in
    # place (no module whose track_running_stats could be turned off): they are restored.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(F.relu(self.bn(self.fc1(x))))

    torch.manual_seed(0)
    batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    qm = qzo_fx.prepare(Net(), qzo_fx.QuantConfig(weight_bits=4), example_inputs=(batch[0],), capture="export")
    names = ["fc1.weight", "fc2.weight"]
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    for strategy in STRATEGIES:  # batched too: vmap cannot update unbatched statistics in place
        Runner(qm, ce, names, strategy).losses(_branches(qm, names), batch, RngState.capture())
        for key, value in qm.state_dict().items():
            assert torch.equal(value, before[key]), (strategy, key)
    # The branch graph normalises with batch statistics and passes no running statistics.
    assert "bn_weight, bn_bias, None, None, True" in BranchGraphs(qm, names).get("lifted").code


def test_branches_share_the_base_pass_dropout_mask(setup):
    qm, batch = setup
    names = ["fc1.weight"]
    zero = [([torch.zeros_like(qm.get_parameter("fc1.weight"))], s) for s in (1.0, -1.0)]
    rng = RngState.capture()
    with torch.no_grad():
        base = ce(qm, batch)  # consumes the RNG as the base pass of a step does
        for m in qm.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.zero_(), m.running_var.fill_(1), m.num_batches_tracked.zero_()
    for strategy in STRATEGIES:
        losses = Runner(qm, ce, names, strategy).losses(zero, batch, rng)
        # Same mask as the base pass: bit-equal, except for batched GEMM rounding.
        tol = dict(rtol=1e-6, atol=1e-6) if strategy == "batched" else dict(rtol=0, atol=0)
        torch.testing.assert_close(losses, torch.stack([base, base]), **tol, msg=strategy)


def test_fogzo_step_writes_estimate_and_counts(setup):
    qm, batch = setup
    est = qzo_fx.FOGZO(beta_min=0.9, total_steps=10, seed=7)
    step = qzo_fx.train_step(qm, ce, est, strategy="sequential")
    loss = step(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert step.stats.forward_passes == 3 and step.stats.backward_passes == 1
    assert step.stats.fwd_equivalents == est.fwd_equivalents == 5
    assert step.stats.beta == 1.0  # the schedule starts at 1
    assert qm.get_parameter("fc1.weight").grad is not None and qm.get_parameter("fc1.bias").grad is not None
    step(batch)
    assert step.stats.beta == pytest.approx(1 - 0.1 * 1 / 10)


def test_same_seed_same_estimate_for_every_strategy(setup):
    qm, batch = setup
    grads = []
    for strategy in STRATEGIES + ("lean",):
        qm.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(beta_min=0.5, schedule="constant", seed=11), strategy=strategy)(batch)
        grads.append(qm.get_parameter("fc1.weight").grad.clone())
    for other in grads[1:]:
        torch.testing.assert_close(grads[0], other, rtol=1e-4, atol=1e-6)


def test_lean_strategy_never_writes_parameters_and_streams_its_graph(setup):
    qm, batch = setup
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    step = qzo_fx.train_step(qm, ce, qzo_fx.NSPSA(n=2, seed=0), strategy="lean")
    step(batch)
    # Only the running statistics move (the one unperturbed pass): no branch wrote a tensor.
    moved = {k for k, v in qm.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    lean = step.graphs.get("streamed")
    # every perturbed read: fc1/fc2 weight and bias, and the BatchNorm's own weight and bias
    assert lean.code.count("self.qzo_perturber(") == 6 and "functional_call" in lean.code


def test_beta_one_estimate_is_parallel_to_ste_gradient(setup):
    qm, batch = setup
    qm.eval()  # no dropout: the STE pass below sees the same function
    torch.manual_seed(0)
    qzo_fx.train_step(qm, ce, qzo_fx.STE())(batch)
    ste = torch.cat([qm.get_parameter(n).grad.flatten() for n in ("fc1.weight", "fc2.weight")])
    qm.zero_grad(set_to_none=True)
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(beta_min=1.0, seed=0, eps_float=1e-3), strategy="sequential")
    step(batch)
    fogzo = torch.cat([qm.get_parameter(n).grad.flatten() for n in ("fc1.weight", "fc2.weight")])
    if fogzo.norm() > 0:  # c can be exactly 0 when no weight crosses a rounding boundary
        assert abs(abs(float(F.cosine_similarity(ste, fogzo, dim=0))) - 1) < 1e-5


def test_one_sided_uses_base_loss(setup):
    qm, batch = setup
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(two_sided=False, seed=0, total_steps=5), strategy="inplace")
    step(batch)
    assert step.stats.forward_passes == 2 and len(step.stats.last_branch_losses) == 1


def test_ste_fraction_runs_plain_ste_first(setup):
    qm, batch = setup
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(total_steps=10, ste_fraction=0.5, seed=0))
    for _ in range(5):
        step(batch)
    assert step.stats.forward_passes == 5
    step(batch)
    assert step.stats.forward_passes == 8


def test_nspsa_has_no_backward_and_writes_all_parameters(setup):
    qm, batch = setup
    step = qzo_fx.train_step(qm, ce, qzo_fx.NSPSA(n=3, seed=0), strategy="batched")
    tracked = int(qm.bn.num_batches_tracked)
    step(batch)
    # 2n branches, and one no-grad pass of the model as it is for BatchNorm's running statistics.
    assert step.stats.backward_passes == 0 and step.stats.forward_passes == 7
    assert int(qm.bn.num_batches_tracked) == tracked + 1
    assert all(qm.get_parameter(n).grad is not None for n in ("fc1.weight", "fc1.bias", "bn.weight"))


def test_zero_ste_gradient_falls_back(setup):
    qm, batch = setup
    step = qzo_fx.train_step(qm, lambda m, b: (m(b[0]) * 0).sum(), qzo_fx.FOGZO(beta_min=0.5, schedule="constant",
                                                                             seed=0))
    step(batch)
    # No guide: the STE gradient (zero) is kept, whatever the noise part would have written.
    assert step.stats.zero_gradient_fallbacks == 1
    assert all(torch.equal(qm.get_parameter(n).grad, torch.zeros_like(qm.get_parameter(n)))
               for n in ("fc1.weight", "fc2.weight"))


def test_nonfinite_raise_or_skip(setup):
    qm, batch = setup
    bad = (torch.full((32, 12), float("nan")), batch[1])
    with pytest.raises(qzo_fx.NonFiniteLossError, match="on_nonfinite='skip'"):
        qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(seed=0))(bad)
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(seed=0), on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="skipped"):
        step(bad)
    assert step.stats.nonfinite_skips == 1
    assert all(p.grad is None for p in qm.parameters())


@pytest.mark.parametrize("estimator", [lambda: qzo_fx.STE(), lambda: qzo_fx.FOGZO(beta_min=0.99, total_steps=4, seed=3),
                                       lambda: qzo_fx.NSPSA(n=2, seed=3)], ids=["STE", "FOGZO", "NSPSA"])
def test_gradients_accumulate_over_micro_batches_as_backward_does(estimator):
    # A plain accumulation loop: zero once, one step per micro-batch, then the optimizer. Each
    # .grad must be the sum of what the steps give alone, and FOGZO's guide each batch's own.
    torch.manual_seed(0)
    qm = qzo_fx.prepare(DropNet().eval(), qzo_fx.QuantConfig(weight_bits=2))  # no dropout: same masks
    qm.eval()
    halves = [(torch.randn(8, 12), torch.randint(0, 4, (8,))) for _ in range(2)]
    alone = qzo_fx.train_step(qm, ce, estimator(), strategy="inplace")
    singles = []
    for half in halves:
        qm.zero_grad(set_to_none=True)
        alone(half)
        singles.append({n: p.grad.clone() for n, p in qm.named_parameters() if p.grad is not None})
    accumulating = qzo_fx.train_step(qm, ce, estimator(), strategy="inplace")
    qm.zero_grad(set_to_none=True)
    for half in halves:
        accumulating(half)
    for name, p in qm.named_parameters():
        if name in singles[0]:
            torch.testing.assert_close(p.grad, singles[0][name] + singles[1][name], rtol=1e-6, atol=1e-7)


def test_a_skipped_micro_batch_keeps_what_earlier_ones_accumulated(setup):
    qm, batch = setup
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(beta_min=0.99, total_steps=4, seed=1), on_nonfinite="skip")
    step(batch)
    earlier = {n: p.grad.clone() for n, p in qm.named_parameters()}
    poisoned = (torch.full_like(batch[0], float("nan")), batch[1])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        step(poisoned)
    for name, p in qm.named_parameters():
        assert torch.equal(p.grad, earlier[name])


def test_freezing_between_steps_is_followed(setup):
    qm, batch = setup
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(beta_min=0.99, total_steps=4, seed=0))
    step(batch)
    qm.fc1.requires_grad_(False)  # fine-tune the head only, from now on
    qm.zero_grad(set_to_none=True)
    step(batch)
    assert qm.fc1.weight.grad is None and qm.fc2.weight.grad is not None
    assert "fc1.weight" not in step.names
    qm.fc1.requires_grad_(True)
    step(batch)
    assert "fc1.weight" in step.names and qm.fc1.weight.grad is not None


def test_batched_branches_warn_where_export_graph_dropout_draws_other_masks():
    torch.manual_seed(0)
    qm = qzo_fx.prepare(DropNet(), qzo_fx.QuantConfig(weight_bits=4), example_inputs=(torch.randn(8, 12),),
                        capture="export").train()
    batch = (torch.randn(32, 12), torch.randint(0, 4, (32,)))
    step = qzo_fx.train_step(qm, ce, qzo_fx.NSPSA(n=2, seed=0), strategy="batched")
    with pytest.warns(RuntimeWarning, match="torch.export graph"):
        step(batch)
    from qzo_fx.train.strategies import masks_differ
    assert masks_differ(step.strategy.ctx)  # so strategy="auto" never picks batched here


def test_auto_settles_on_a_strategy(setup):
    qm, batch = setup
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(seed=0), strategy="auto")
    for _ in range(3 * AUTO_ROUNDS + 1):
        step(batch)
    assert step.strategy.chosen in STRATEGIES and step.stats.strategy == step.strategy.chosen
    assert all(len(t) == AUTO_ROUNDS for t in step.strategy.timings.values())


def test_branch_graph_lifts_parameters(setup):
    qm, _ = setup
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(seed=0))
    code = step.branch_graph.code
    assert "def forward(self, theta_fc1_weight, theta_fc2_weight, x):" in code
    assert "self.fc1.weight" not in code and code.count("fake_quant_kernel(theta_") == 2
    diff = qzo_fx.graph_diff(qm, step.branch_graph)
    assert diff.count("\n-    fc1_weight = self.fc1.weight") == 1 and diff.count("\n+    fake_quant_default") == 2
    assert qzo_fx.to_networkx(step.branch_graph).nodes["theta_fc1_weight"]["op"] == "placeholder"


def test_bad_arguments_are_clear(setup):
    qm, _ = setup
    with pytest.raises(qzo_fx.TrainStepError, match="estimator"):
        qzo_fx.train_step(qm, ce, "fogzo")
    with pytest.raises(qzo_fx.TrainStepError, match="strategy"):
        qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(), strategy="fast")
    with pytest.raises(qzo_fx.ConfigError, match="beta_min"):
        qzo_fx.FOGZO(beta_min=2.0)
    with pytest.raises(qzo_fx.TrainStepError, match="no parameter to perturb"):
        qzo_fx.train_step(qzo_fx.prepare(nn.Linear(2, 2), qzo_fx.QuantConfig(weight=None)), ce, qzo_fx.FOGZO())
    with pytest.raises(qzo_fx.TrainStepError, match="scalar"):
        qzo_fx.train_step(qm, lambda m, b: m(b[0]), qzo_fx.STE())(setup[1])


def test_perturbation_sizes_follow_scale_changes():
    """eps = step * eps_bar is cached between steps, but never outlives a scale change: an
    in-place update (a learned scale's optimizer step) or a new scale tensor (re-calibration)."""
    torch.manual_seed(0)
    spec = qzo_fx.QuantSpec(bits=2, granularity="per_tensor")
    qm = qzo_fx.prepare(torch.nn.Linear(6, 3), qzo_fx.QuantConfig(weight=spec))
    step = qzo_fx.train_step(qm, lambda m, b: m(b).square().mean(), qzo_fx.FOGZO(total_steps=10, seed=0))
    quantizer = step.perturbed[0].quantizer
    first = step.eps(1e-3)[0].clone()
    assert torch.equal(step.eps(1e-3)[0], first)
    with torch.no_grad():
        quantizer.scale.mul_(2.0)
    torch.testing.assert_close(step.eps(1e-3)[0], 2 * first)
    quantizer.scale = quantizer.scale.detach() * 3.0  # a new tensor, as re-calibration makes
    torch.testing.assert_close(step.eps(1e-3)[0], 6 * first)


def test_random_ops_are_found_in_modules_and_graphs():
    from qzo_fx.train.random_ops import uses_randomness

    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.randn_like(x)

    cfg = qzo_fx.QuantConfig(weight_bits=2)
    assert uses_randomness(qzo_fx.prepare(DropNet(), cfg))
    assert uses_randomness(qzo_fx.prepare(Noisy(), cfg, example_inputs=(torch.randn(2, 3),)))
    assert not uses_randomness(qzo_fx.prepare(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0)), cfg))
    # aten graphs (the torch.export route) carry the nondeterministic_seeded tag
    exported = torch.export.export(Noisy(), (torch.randn(2, 3),)).module()
    assert uses_randomness(exported)
