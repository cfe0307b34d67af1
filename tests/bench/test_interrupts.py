"""basin.bench.interrupts: Ctrl-C held over storage writes, let through in training."""

from __future__ import annotations

import signal
import threading

import pytest

from basin.bench import interrupts


@pytest.fixture(autouse=True)
def default_sigint():
    """As in a terminal (a pytest-xdist worker may run with another disposition)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_hold_defers_a_ctrl_c_to_the_end_of_the_block() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.hold():
            signal.raise_signal(signal.SIGINT)
            done.append("after the signal")
        done.append("never")
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_raises_at_once() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.hold():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            done.append("never")
    assert done == []
    with interrupts.hold():  # nothing left pending
        pass


def test_allow_lets_it_through_and_raises_a_held_one_on_entry() -> None:
    with interrupts.hold():
        with pytest.raises(KeyboardInterrupt), interrupts.allow():
            signal.raise_signal(signal.SIGINT)
            pytest.fail("not raised in the allowed region")
        signal.raise_signal(signal.SIGINT)  # held again
        with pytest.raises(KeyboardInterrupt), interrupts.allow():
            pytest.fail("the held Ctrl-C was not raised on entry")
        with interrupts.hold():  # nested: a pending one waits for the outer end
            with interrupts.hold():
                signal.raise_signal(signal.SIGINT)
            reached = True
        assert reached
        with pytest.raises(KeyboardInterrupt), interrupts.allow():
            pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_held_ctrl_c_wins_over_an_error_leaving_the_block() -> None:
    with pytest.raises(KeyboardInterrupt) as info:
        with interrupts.hold():
            signal.raise_signal(signal.SIGINT)
            raise RuntimeError("write failed")
    assert isinstance(info.value.__context__, RuntimeError)


def test_nothing_changes_off_the_main_thread_or_under_another_handler() -> None:
    seen = []

    def other() -> None:
        with interrupts.hold():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler]

    calls = []
    signal.signal(signal.SIGINT, lambda *_: calls.append(1))
    with interrupts.hold():
        signal.raise_signal(signal.SIGINT)  # the user's handler runs, nothing is held
    assert calls == [1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with interrupts.hold():
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_held_runs_each_call_in_its_own_hold_block() -> None:
    done = []

    @interrupts.held
    def work(tag: str) -> str:
        signal.raise_signal(signal.SIGINT)
        done.append(tag)
        return tag

    for tag in ("first", "second"):
        with pytest.raises(KeyboardInterrupt):
            work(tag)
    assert done == ["first", "second"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
