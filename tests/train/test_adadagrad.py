"""AdAdaGrad's adaptive batch sizes (arXiv:2402.11215): per-sample gradients and the three
tests against closed forms on linear least squares (float64), the controller's rules, and
``basin bench --adaptive-batch`` recording a growing batch size."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from basin.train import AdaptiveBatchSize, per_sample_gradients
from basin.train.adadagrad import inner_product_test, norm_test, orthogonality_test


def _least_squares(b: int = 24, d: int = 5, bias: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    y = torch.randn(b, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=bias).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=gen, dtype=torch.float64))
        if bias:
            model.bias.fill_(0.3)
    r = (model(x) - y).squeeze(1).detach()  # residuals; loss_i = r_i^2, grad_i = 2 r_i (x_i, 1)
    return model, x, y, r


def test_per_sample_gradients_are_the_analytic_ones() -> None:
    model, x, y, r = _least_squares(bias=True)
    before = [p.detach().clone() for p in model.parameters()]
    grads, sizes = per_sample_gradients(model, nn.functional.mse_loss, x, y)
    expected = torch.cat([2 * r[:, None] * x, 2 * r[:, None]], dim=1)
    torch.testing.assert_close(grads, expected, rtol=1e-13, atol=1e-14)
    assert sizes == [5, 1]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


def test_the_three_tests_match_their_closed_forms() -> None:
    """With g_i = 2 r_i x_i and g their mean: sum_j Var_ij = (sum |g_i|^2 - b|g|^2) / (b-1);
    the inner products p_i = 2 r_i <x_i, g> have mean |g|^2, so Var p = (sum p_i^2 - b|g|^4) /
    (b-1); the orthogonal parts have mean 0 and |o_i|^2 = |g_i|^2 - p_i^2 / |g|^2."""
    model, x, y, r = _least_squares()
    b = len(x)
    grads, _ = per_sample_gradients(model, nn.functional.mse_loss, x, y)
    g = (2 * r[:, None] * x).mean(0)
    g2 = float(g @ g)
    sq = 4 * r**2 * (x**2).sum(1)  # |g_i|^2
    p = 2 * r * (x @ g)
    eta, theta, nu = 0.1, 0.2, 0.3
    norm = float((sq.sum() - b * g2) / (b - 1)) / (eta**2 * g2)
    ip = float(((p**2).sum() - b * g2**2) / (b - 1)) / (theta**2 * g2**2)
    orth = float((sq - p**2 / g2).sum() / (b - 1)) / (nu**2 * g2)
    assert norm_test(grads, eta) == pytest.approx(norm, rel=1e-12)
    assert inner_product_test(grads, theta) == pytest.approx(ip, rel=1e-12)
    assert orthogonality_test(grads, nu) == pytest.approx(orth, rel=1e-12)
    ctl = AdaptiveBatchSize(b, 10**9, "augmented", theta=theta, nu=nu)
    assert ctl.statistic(grads) == pytest.approx(max(ip, orth), rel=1e-12)
    assert ctl.update(model, nn.functional.mse_loss, x, y) == max(b, math.ceil(max(ip, orth)))


def test_per_tensor_statistics_are_the_authors_blockwise_form() -> None:
    """per_tensor: the weight block 2 r_i x_i and the bias block 2 r_i each give their own
    inner products and projections, summed; it differs from the whole-vector statistic."""
    model, x, y, r = _least_squares(bias=True)
    b = len(x)
    grads, sizes = per_sample_gradients(model, nn.functional.mse_loss, x, y)
    gw, gb = (2 * r[:, None] * x).mean(0), (2 * r).mean()
    g2 = float(gw @ gw + gb**2)
    pw, pb = 2 * r * (x @ gw), 2 * r * gb  # per-block inner products, means |gw|^2 and gb^2
    var_ip = float(((pw**2).sum() - b * (gw @ gw) ** 2 + (pb**2).sum() - b * gb**4) / (b - 1))
    sq_w, sq_b = 4 * r**2 * (x**2).sum(1), 4 * r**2
    var_orth = float((sq_w - pw**2 / (gw @ gw) + sq_b - pb**2 / gb**2).sum() / (b - 1))
    assert inner_product_test(grads, 0.1, sizes) == pytest.approx(
        var_ip / (0.01 * g2**2), rel=1e-12
    )
    assert orthogonality_test(grads, 0.1, sizes) == pytest.approx(var_orth / (0.01 * g2), rel=1e-12)
    assert inner_product_test(grads, 0.1) != pytest.approx(inner_product_test(grads, 0.1, sizes))
    ctl = AdaptiveBatchSize(b, 10**9, "inner_product", per_tensor=True)
    assert ctl.statistic(grads, sizes) == pytest.approx(var_ip / (0.01 * g2**2), rel=1e-12)


def test_controller_grows_never_shrinks_and_is_capped() -> None:
    ctl = AdaptiveBatchSize(8, 100)
    assert ctl.propose(3.2) == 8  # below b: unchanged
    assert ctl.propose(20.1) == 21  # ceiling
    assert ctl.propose(10.0) == 21  # never shrinks
    assert ctl.propose(float("nan")) == 21
    assert ctl.propose(1e6) == 100  # capped
    assert ctl.propose(math.inf) == 100
    model, x, y, _ = _least_squares()
    every = AdaptiveBatchSize(2, 10**6, every=3)
    sizes = [every.update(model, nn.functional.mse_loss, x, y) for _ in range(4)]
    assert sizes[0] > 2 and sizes[0] == sizes[1] == sizes[2]  # tested at calls 1 and 4 only
    assert every.n_updates == 4
    capped = AdaptiveBatchSize(4, 4)
    assert capped.update(model, nn.functional.mse_loss, x, y) == 4
    assert capped.last_statistic is None  # at the cap no test runs
    clone = AdaptiveBatchSize(2, 10**6, every=3)
    clone.load_state_dict(every.state_dict())
    assert (clone.batch_size, clone.n_updates) == (every.batch_size, 4)


def test_zero_mean_gradient_goes_to_the_cap() -> None:
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert norm_test(grads) == math.inf
    assert norm_test(torch.zeros(3, 2)) == 0.0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"batch_size": 1, "max_batch_size": 10}, "batch_size must be an integer >= 2"),
        ({"batch_size": 8, "max_batch_size": 4}, "max_batch_size must be an integer >= 8"),
        ({"test": "variance"}, "test must be one of norm, inner_product, augmented"),
        ({"eta": 0.0}, r"eta must be in \(0, inf\)"),
        ({"theta": float("nan")}, "theta"),
        ({"nu": -1.0}, "nu"),
        ({"every": 0}, "every must be an integer >= 1"),
        ({"per_tensor": 1}, "per_tensor must be True or False"),
        ({"test_samples": 1}, "test_samples must be an integer >= 2"),
    ],
)
def test_invalid_arguments_raise(kw, match) -> None:
    args = {"batch_size": 8, "max_batch_size": 64, **kw}
    with pytest.raises(ValueError, match=match):
        AdaptiveBatchSize(**args)


def test_batchnorm_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="BatchNorm"):
        per_sample_gradients(model, nn.functional.mse_loss, torch.randn(4, 3), torch.randn(4, 4))


def test_bench_adaptive_batch_records_a_growing_series(tmp_path) -> None:
    """``basin bench --adaptive-batch inner_product``: the stored series starts at the first
    batch size, grows over several steps, never decreases, stays under the cap; its second
    entry is the test on the run's first batch at the initial weights, recomputed here."""
    from basin.bench import Store
    from basin.bench import workloads as wl
    from basin.cli import main

    torch.set_num_threads(1)
    db = tmp_path / "a.db"
    assert main(["bench", "-w", "mnist1d_mlp", "-o", "torch:adamw", "--seeds", "1", "--steps",
                 "12", "--batch-size", "8", "--adaptive-batch", "inner_product",
                 "--max-batch-size", "400", "--storage", str(db), "--quiet", "--no-report"]) == 0  # fmt: skip
    (rec,) = Store(str(db)).runs()
    assert rec["config"]["adaptive_batch"] == {"test": "inner_product", "max_batch_size": 400}
    series = rec["series"]["batch_size"]
    values = series["value"]
    assert series["step"][0] == 1 and values[0] == 8
    assert all(a < b for a, b in zip(values, values[1:])) and len(values) >= 4
    assert values[-1] <= 400
    task = wl.get("mnist1d_mlp").build(0, 8)
    x, y = next(task.batches)
    grads, _ = per_sample_gradients(task.model, task.loss_fn, x, y)
    assert values[1] == min(400, max(8, math.ceil(inner_product_test(grads, 0.1))))
    assert series["step"][1] == 2
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 8"):
        from basin.bench import make_config

        make_config("mnist1d_mlp", "torch:adamw", batch_size=8,
                    adaptive_batch={"test": "norm", "max_batch_size": 4})  # fmt: skip


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--max-batch-size", "64"], "--max-batch-size caps --adaptive-batch"),
        (["--adaptive-batch", "norm", "--tune", "2"], "not with --tune"),
        (["--adaptive-batch", "variance"], "test must be one of norm, inner_product, augmented"),
        (["--adaptive-batch", "norm", "-o", "saf"], "does not combine with a training method"),
    ],
)
def test_bench_adaptive_batch_bad_input_exits_2(tmp_path, capsys, extra, match) -> None:
    from basin.cli import main

    args = ["bench", "-w", "mnist1d_mlp", "-o", "torch:adamw", "--seeds", "1", "--steps", "2",
            "--storage", str(tmp_path / "x.db"), "--quiet", "--no-report", *extra]  # fmt: skip
    assert main(args) == 2
    assert match in capsys.readouterr().err
