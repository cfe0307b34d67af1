"""SGD-SaI specifics: momentum=0 (the reference crashes), single-entry tensors, tensors that
first get a gradient late, and the paper transcription checked against the authors' package."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
from references.sgd_sai_paper import SGDSaIPaper
from sgd_sai import SGD_sai
from torch import nn

import basin.optim as bo
from basin.optim.sgd_sai import gradient_snr


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def _data(n: int):
    gen = torch.Generator().manual_seed(2)
    return [
        (torch.randn(32, 8, generator=gen, dtype=torch.float64), torch.randint(0, 4, (32,), generator=gen))
        for _ in range(n)
    ]  # fmt: skip


def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints on its first step
            opt.step()


def _close(a: nn.Module, b: nn.Module, rtol: float = 1e-10) -> None:
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert (pa - pb).abs().max() <= rtol * pb.abs().max()


def test_reference_crashes_with_momentum_zero_while_basin_matches_the_transcription() -> None:
    ref_model = _model()
    ref = SGD_sai(ref_model.parameters(), momentum=0.0)
    with pytest.raises((UnboundLocalError, NameError)):
        _train(ref_model, ref, _data(1))

    ours, paper = _model(), _model()
    _train(ours, bo.SGDSaI(ours.parameters(), momentum=0.0), _data(100))
    _train(paper, SGDSaIPaper(paper.parameters(), momentum=0.0), _data(100))
    _close(ours, paper)
    assert not torch.equal(ours[0].weight, _model()[0].weight)


@pytest.mark.parametrize("hp", [{}, {"momentum": 0.5, "weight_decay": 0.1, "lr": 3e-3}], ids=str)
def test_transcription_agrees_with_the_authors_package(hp) -> None:
    """Validates the transcription used for momentum=0 where the package can run."""
    a, b = _model(), _model()
    _train(a, SGDSaIPaper(a.parameters(), **hp), _data(100))
    _train(b, SGD_sai(b.parameters(), **hp), _data(100))
    _close(a, b)


@pytest.mark.filterwarnings("ignore:std")
def test_single_entry_tensor_and_bias_follow_the_reference() -> None:
    """A 1-entry tensor has an undefined std: the reference's nan_to_num makes it 0, so the
    g-SNR is |g|/eps (a huge step scale); biases get g-SNR and weight decay like any tensor."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 1)).double()  # weight (1, 3) and a single-entry bias
    ref_model = copy.deepcopy(model)
    hp = {"lr": 1e-9, "weight_decay": 0.1}
    opt, ref = bo.SGDSaI(model.parameters(), **hp), SGD_sai(ref_model.parameters(), **hp)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, generator=gen, dtype=torch.float64), None) for _ in range(20)]
    for x, _ in data:
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            with contextlib.redirect_stdout(io.StringIO()):
                o.step()
    bias, ref_bias = model[0].bias, ref_model[0].bias
    g_first = opt.state[bias]["gsnr"] * 1e-8  # = |g_1|
    assert opt.state[bias]["gsnr"] > 1e5 and g_first > 0
    assert torch.allclose(opt.state[bias]["gsnr"], ref.state[ref_bias]["gsnr"], rtol=1e-12)
    _close(model, ref_model)


def test_gradient_snr_closed_form() -> None:
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)  # ||g|| = 5, unbiased std = 1/sqrt(2)
    assert gradient_snr(g, 0.0).item() == pytest.approx(5 * 2**0.5, rel=1e-14)
    assert gradient_snr(torch.tensor([-2.0], dtype=torch.float64), 0.5).item() == 4.0
    # bfloat16 gradients: computed in float32
    assert gradient_snr(g.bfloat16(), 0.0).dtype == torch.float32


def test_tensor_with_late_first_gradient() -> None:
    """The reference takes g-SNR only at the optimizer's first step (a tensor first receiving a
    gradient later raises KeyError there); basin takes it at each tensor's first gradient."""
    a = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = bo.SGDSaI([a, b])
    ref = SGD_sai([a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()])
    ga = torch.randn(4, 3, dtype=torch.float64)
    gb = torch.randn(5, dtype=torch.float64)
    a.grad = ga.clone()
    opt.step()
    assert b not in opt.state
    ref.param_groups[0]["params"][0].grad = ga.clone()
    with contextlib.redirect_stdout(io.StringIO()):
        ref.step()
    a.grad, b.grad = ga.clone(), gb.clone()
    b_before = b.detach().clone()
    opt.step()
    assert opt.state[b]["gsnr"].item() == pytest.approx(gradient_snr(gb, 1e-8).item(), rel=1e-14)
    expected = b_before * (1 - 1e-2 * 1e-2) - 1e-2 * gradient_snr(gb, 1e-8) * gb
    assert torch.allclose(b.detach(), expected, rtol=1e-13, atol=0)
    ref.param_groups[0]["params"][1].grad = gb.clone()
    ref.param_groups[0]["params"][0].grad = ga.clone()
    with pytest.raises(KeyError):
        ref.step()
