"""basin's LoRA layer: merged weight, zero-init B, only A/B train, add_lora targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from basin.train import LoRALinear, add_lora, lora_parameters


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8)), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def test_merged_weight_is_base_plus_scaled_ba():
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(6, 4).double(), r=2, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 6, dtype=torch.float64)
    w = layer.base.weight + 3.0 * (layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer.merged_weight(), w, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), x @ w.t() + layer.base.bias, rtol=1e-14, atol=1e-14)
    merged = layer.merge()
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-14, atol=1e-14)
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (4, 2)


def test_zero_init_b_leaves_the_output_unchanged():
    m = model()
    x = torch.randn(7, 6, dtype=torch.float64)
    before = m(x)
    add_lora(m, r=4, alpha=8)
    assert torch.equal(m(x), before)
    assert all(
        torch.equal(p, torch.zeros_like(p)) for n, p in m.named_parameters() if "lora_B" in n
    )


def test_only_a_and_b_train():
    m = add_lora(model(), r=2, alpha=4)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(lora_parameters(m)) == 6
    frozen = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in lora_parameters(m)[1::2])


def test_targets_by_suffix_and_regex():
    m = add_lora(model(), targets=["4"])
    assert isinstance(m[4], LoRALinear) and not isinstance(m[0], LoRALinear)
    m = add_lora(model(), targets=["0"])  # a suffix: "0" and "2.0"
    assert isinstance(m[0], LoRALinear) and isinstance(m[2][0], LoRALinear)
    m = add_lora(model(), targets=r"2\.\d+")
    assert isinstance(m[2][0], LoRALinear) and not isinstance(m[0], LoRALinear)
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(model(), targets=["q_proj"])


@pytest.mark.parametrize(
    "kw,needle", [({"r": 0}, "r must"), ({"alpha": 0.0}, "alpha"), ({"dropout": 1.0}, "dropout")]
)
def test_invalid_arguments_raise(kw, needle):
    with pytest.raises(ValueError, match=needle):
        LoRALinear(nn.Linear(3, 3), **kw)
