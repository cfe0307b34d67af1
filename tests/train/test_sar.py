"""SAR against the float64 transcription of the authors' forward_and_adapt_sar; what it adapts,
its filters, its recovery and its argument checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from references.sar_paper import SARPaper
from torch import nn

import basin.optim as bo
from basin.train import SAR
from basin.train.sar import authors_skip, norm_parameters, softmax_entropy

C = 5


class Net(nn.Module):
    """Conv + BatchNorm2d, conv + GroupNorm, linear + LayerNorm, head; ``layer4`` holds a norm
    that the authors' rule skips."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.gn = nn.Conv2d(6, 6, 3, padding=1), nn.GroupNorm(2, 6)
        self.fc, self.ln = nn.Linear(6, 8), nn.LayerNorm(8)
        self.layer4 = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, C)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.gn(self.conv2(h))).mean((2, 3))
        h = torch.relu(self.ln(self.fc(h)))
        return self.head(h + self.layer4(h))


def make_net(seed=0, scale=1.0):
    torch.manual_seed(seed)
    net = Net().double()
    with torch.no_grad():
        net.head.weight.mul_(scale)
    return net


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 6, 6, generator=gen, dtype=torch.float64) for _ in range(n)]


def assert_same(a, b, what, rtol=1e-12):
    a, b = a.double(), b.double()
    err = (a - b).abs().max() / b.abs().max().clamp_min(1e-300)
    assert err <= rtol, f"{what}: {err:.2e}"


@pytest.mark.parametrize("margin_factor", [0.4, 0.9])
def test_matches_the_authors_forward_and_adapt(margin_factor):
    """Outputs, adapted parameters and EMA equal the transcription over 12 batches (a margin
    that filters part of each batch, and one that filters little); lr large enough to move."""
    margin = margin_factor * math.log(C)
    net = make_net(scale=3.0)
    ref_net = copy.deepcopy(net)
    sar = SAR(net, lr=0.05, margin=margin)
    ref = SARPaper(ref_net, lr=0.05, margin=margin)
    start = copy.deepcopy(net.state_dict())
    for x in batches(12):
        out, ref_out = sar(x), ref.forward(x)
        assert_same(out, ref_out, "outputs")
        assert (sar.ema is None) == (ref.ema is None)
        if sar.ema is not None:
            assert sar.ema == pytest.approx(ref.ema, rel=1e-12)
        assert sar.resets == ref.resets
    for (k, v), (_, r) in zip(net.state_dict().items(), ref_net.state_dict().items()):
        assert_same(v, r, k)
    assert any(not torch.equal(v, start[k]) for k, v in net.state_dict().items())


def test_reset_events_match_and_restore_exactly():
    """A reset threshold above the EMA makes every batch reset: the same events as the
    transcription, and the model (and SGD momentum) exactly at the initial state after each."""
    margin = 0.9 * math.log(C)
    net = make_net(scale=3.0)
    ref_net = copy.deepcopy(net)
    sar = SAR(net, lr=0.05, margin=margin, reset_constant=10.0)
    ref = SARPaper(ref_net, lr=0.05, margin=margin, reset_constant=10.0)
    initial = copy.deepcopy(net.state_dict())
    for x in batches(4):
        assert_same(sar(x), ref.forward(x), "outputs")
    assert sar.resets == ref.resets == 4 and sar.ema is None
    for k, v in net.state_dict().items():
        assert torch.equal(v, initial[k]), k
    assert not sar.optimizer.state or all(not st for st in sar.optimizer.state.values()), (
        "momentum kept"
    )


def test_reset_is_public_and_exact():
    net = make_net(scale=3.0)
    sar = SAR(net, lr=0.05, margin=0.9 * math.log(C))
    initial = copy.deepcopy(net.state_dict())
    for x in batches(3):
        sar.adapt(x)
    assert any(not torch.equal(v, initial[k]) for k, v in net.state_dict().items())
    sar.reset()
    assert sar.ema is None
    for k, v in net.state_dict().items():
        assert torch.equal(v, initial[k]), k


def test_only_norm_affine_parameters_change_and_the_skip_rule():
    net = make_net(scale=3.0)
    start = {k: v.clone() for k, v in net.named_parameters()}
    sar = SAR(net, lr=0.05, margin=0.9 * math.log(C))
    assert sar.param_names == [
        "bn.weight",
        "bn.bias",
        "gn.weight",
        "gn.bias",
        "ln.weight",
        "ln.bias",
    ]
    for x in batches(3):
        sar(x)
    for k, v in net.named_parameters():
        changed = not torch.equal(v, start[k])
        assert changed == (k in sar.param_names), k
    # the rule as an option: None adapts every norm layer, layer4's too
    params, names = norm_parameters(make_net(), skip=None)
    assert "layer4.1.weight" in names and len(params) == 8
    assert authors_skip("blocks.10.norm1") and authors_skip("norm") and not authors_skip("ln")


def test_a_batch_with_every_entropy_above_the_margin_changes_nothing():
    """Nothing passes the filter: zero gradients, no perturbation, and on a fresh SAR (no
    momentum yet) no change at all; the EMA is not updated."""
    net = make_net(scale=0.01)  # near-uniform predictions: entropy ~ ln C
    x = batches(1)[0]
    e = softmax_entropy(copy.deepcopy(net)(x))
    margin = 0.4 * math.log(C)
    assert bool((e > margin).all())
    sar = SAR(net, lr=0.05)
    start = copy.deepcopy(net.state_dict())
    out = sar(x)
    assert sar.ema is None
    for k, v in net.state_dict().items():
        assert torch.equal(v, start[k]), k
    assert_same(out, make_net(scale=0.01)(x), "outputs")


def test_skip_empty_stops_momentum_drift():
    """After adapting, an all-filtered batch still moves the weights through SGD momentum (as the
    authors' code does); skip_empty=True takes no step at all."""
    for skip_empty, moves in ((False, True), (True, False)):
        net = make_net(scale=3.0)
        sar = SAR(net, lr=0.05, margin=0.9 * math.log(C), skip_empty=skip_empty)
        for x in batches(2):
            sar(x)
        sar.margin = 1e-9  # nothing passes
        before = copy.deepcopy(net.state_dict())
        sar(batches(1, seed=5)[0])
        changed = any(not torch.equal(v, before[k]) for k, v in net.state_dict().items())
        assert changed == moves


def test_margin_defaults_to_04_ln_c_and_first_filter_applies():
    net = make_net(scale=3.0)
    ref_net = copy.deepcopy(net)
    sar = SAR(net, lr=0.05)
    ref = SARPaper(ref_net, lr=0.05, margin=0.4 * math.log(C))
    for x in batches(3):
        assert_same(sar(x), ref.forward(x), "outputs")


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"lr": 0.0}, "lr"),
        ({"rho": -1.0}, "rho"),
        ({"margin": 0.0}, "margin"),
        ({"reset_constant": float("nan")}, "reset_constant"),
        ({"momentum": 1.0}, "momentum"),
        ({"steps": 0}, "steps"),
        ({"episodic": 1}, "episodic"),
        ({"skip": "layer4"}, "skip"),
    ],
)
def test_invalid_arguments_raise(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SAR(make_net(), **kw)


def test_not_in_the_optimizer_registry():
    assert "sar" not in bo.available()
