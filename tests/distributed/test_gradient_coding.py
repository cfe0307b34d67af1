"""Gradient coding (Tandon et al.) and SR-SGC (Krishnan et al.): the decoded gradient equals the
uncoded sum for every straggler pattern the scheme must tolerate (exhaustive, float64), and on
4 real gloo ranks (tests/fed_spawn.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from fed_spawn import (
    CODE_S,
    CODE_STRAGGLERS,
    SGC,
    SGC_JOBS,
    SGC_PATTERN,
    WORLD,
    partial_gradient,
)

from basin.distributed import (
    GradientCode,
    SelectiveReattemptSGC,
    follows_bursty_model,
    simulate_sequential_gradient_coding,
)


def _full(job, n):
    return sum(partial_gradient(job, j) for j in range(n))


@pytest.mark.parametrize(
    "n, s, scheme",
    [
        (5, 2, "cyclic"),
        (7, 3, "cyclic"),
        (6, 1, "cyclic"),
        (4, 3, "cyclic"),
        (5, 0, "cyclic"),
        (6, 2, "fractional"),
        (6, 1, "fractional"),
        (4, 3, "fractional"),
    ],
)
def test_every_straggler_pattern_decodes_to_the_full_gradient(n, s, scheme):
    code = GradientCode(n, s, scheme)
    g = [partial_gradient(0, j) for j in range(n)]
    full = sum(g)
    assert all(len(code.parts(i)) == s + 1 for i in range(n))  # load (s + 1) / n
    for k in range(s + 1):
        for late in itertools.combinations(range(n), k):
            msgs = {i: code.encode(i, g) for i in range(n) if i not in late}
            torch.testing.assert_close(code.decode(msgs), full, rtol=0, atol=1e-10)
    late = tuple(range(s + 1))  # one straggler too many
    with pytest.raises(ValueError, match="need at least n - s"):
        code.decode({i: code.encode(i, g) for i in range(n) if i not in late})


def test_encoding_is_lazy_and_wrong_math_is_caught():
    code = GradientCode(5, 2)
    asked = []
    code.encode(1, lambda j: asked.append(j) or partial_gradient(0, j))
    assert asked == code.parts(1) == [1, 2, 3]
    # the code's null-space property is what decoding rests on: perturb one coefficient
    g = [partial_gradient(0, j) for j in range(5)]
    code.C[0, 1] += 1e-3
    msgs = {i: code.encode(i, g) for i in (0, 1, 3)}
    with pytest.raises(ValueError, match="do not span"):
        code.decode(msgs)


def _patterns(n, rounds):
    subsets = [set(c) for k in range(n + 1) for c in itertools.combinations(range(n), k)]
    return itertools.product(subsets, repeat=rounds)


@pytest.mark.parametrize(
    "n, burst, window, lam, jobs",
    [(4, 1, 3, 2, 2), (4, 2, 5, 2, 2), pytest.param(4, 1, 2, 2, 2, marks=pytest.mark.slow)],
)
def test_sr_sgc_decodes_every_pattern_of_the_bursty_model(n, burst, window, lam, jobs):
    """Exhaustive over every straggler pattern on ``jobs + B`` rounds that fits the
    ``(B, W, lambda)`` model (pruned prefix by prefix): every job decodes by its deadline
    without waiting for a straggler, to the uncoded gradient."""
    s = SelectiveReattemptSGC(n, burst, window, lam).s
    checked = beyond_s = 0
    subsets = [set(c) for k in range(n + 1) for c in itertools.combinations(range(n), k)]

    def walk(prefix):
        nonlocal checked, beyond_s
        if not follows_bursty_model(prefix, burst, window, lam):
            return
        if len(prefix) < jobs + burst:
            for nxt in subsets:
                walk(prefix + [nxt])
            return
        sch = SelectiveReattemptSGC(n, burst, window, lam)
        out = simulate_sequential_gradient_coding(sch, partial_gradient, jobs, prefix)
        assert sch.waits == 0, prefix
        assert len(out) == jobs
        for t in range(jobs):
            torch.testing.assert_close(out[t], _full(t, n), rtol=0, atol=1e-10)
        checked += 1
        beyond_s += any(len(r) > s for r in prefix)

    walk([])
    assert checked > 50 and beyond_s > 10  # patterns plain GC with this s could not survive


def test_sr_sgc_parameters():
    sch = SelectiveReattemptSGC(8, burst=2, window=5, lam=4)
    assert sch.s == 2 and sch.delay == 2 and sch.load == 3 / 8  # ceil(2 * 4 / 6) = 2
    # a pattern outside the model makes the master wait instead of failing
    sch = SelectiveReattemptSGC(4, 1, 3, 2)
    out = simulate_sequential_gradient_coding(sch, partial_gradient, 2, [[0, 1, 2], [0, 1, 2]])
    assert sch.waits == 1
    for t in range(2):
        torch.testing.assert_close(out[t], _full(t, 4), rtol=0, atol=1e-10)


def test_bursty_model():
    assert follows_bursty_model([[0], [0], [], [1]], burst=2, window=3, lam=1) is False  # {0,1}
    assert follows_bursty_model([[0], [0], [], [], [1]], burst=2, window=3, lam=1)
    assert not follows_bursty_model([[0], [], [0]], burst=2, window=3, lam=1)  # span 3 > B
    assert follows_bursty_model([[0], [], [0]], burst=3, window=3, lam=1)
    assert not follows_bursty_model([[0, 1, 2]], burst=1, window=2, lam=2)


def test_real_process_group(fed_ranks):
    for r in fed_ranks:
        res = r["coding"]
        torch.testing.assert_close(res["one"], _full(0, WORLD), rtol=0, atol=1e-10)
        assert not torch.isnan(res["one"]).any() and CODE_STRAGGLERS and CODE_S == 1
        assert res["waits"] == 0 and len(res["seq"]) == SGC_JOBS
        for t in range(SGC_JOBS):
            torch.testing.assert_close(res["seq"][t], _full(t, WORLD), rtol=0, atol=1e-10)
            assert torch.equal(res["seq"][t], fed_ranks[0]["coding"]["seq"][t])
        # round 0 lost 2 > s = 1 workers: one of them (worker 0) re-attempted job 0 in round 1
        assert res["tasks"][1] == {0: 0, 1: 1, 2: 1, 3: 1}
    assert follows_bursty_model(SGC_PATTERN, SGC["burst"], SGC["window"], SGC["lam"])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n": 4, "s": 4}, r"s must be in \[0, n - 1\]"),
        ({"n": 4, "s": 5}, r"s must be in \[0, n - 1\]"),
        ({"n": 4, "s": -1}, "s must be an integer >= 0"),
        ({"n": 1, "s": 0}, "n must be an integer >= 2"),
        ({"n": 5, "s": 1, "scheme": "fractional"}, r"\(s \+ 1\) to divide n"),
        ({"n": 5, "s": 1, "scheme": "mds"}, "scheme must be one of"),
    ],
)
def test_bad_code(kw, match):
    with pytest.raises(ValueError, match=match):
        GradientCode(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n": 4, "burst": 0, "window": 3, "lam": 2}, "burst must be an integer >= 1"),
        ({"n": 4, "burst": 2, "window": 2, "lam": 2}, "window must be an integer >= 3"),
        ({"n": 4, "burst": 2, "window": 4, "lam": 2}, "burst must divide window - 1"),
        ({"n": 4, "burst": 1, "window": 3, "lam": 4}, r"lam must be in \[1, n - 1\]"),
        ({"n": 4, "burst": 1, "window": 3, "lam": 0}, "lam must be an integer >= 1"),
    ],
)
def test_bad_sr_sgc(kw, match):
    with pytest.raises(ValueError, match=match):
        SelectiveReattemptSGC(**kw)
