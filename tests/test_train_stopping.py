"""Stopping training early: durations, the time-limit rule on a simulated clock, signal handlers."""

import os
import signal
import time

import pytest

import audiotok.train.stopping as stopping
from audiotok.train.stopping import StopControl, TrainingInterrupted, parse_duration
from audiotok.utils.distributed import DistEnv


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("9m", 540), ("1.5h", 5400), (" 2 d ", 172800),
                                           (".5m", 30), (45, 45), (2.5, 2.5), ("10M", 600), ("2h30m", 9000),
                                           ("1d 2h", 93600), ("1m30s", 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "9 minutes", "1h30", "30 1h", "h30m", "-5", "0", "0s", "0h0m", "inf",
                                  "1e3", True])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


class Clock:
    """A simulated ``monotonic``: it moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _simulate(monkeypatch, limit: float, step_s: list[float], save_s: float, every: int = 1000,
              checkpoint_bytes: int = 0) -> tuple[int, float]:
    """Run the loop protocol on a simulated clock: steps taking ``step_s[i]``, a periodic save every ``every``
    steps taking ``save_s``, and the final save; -> (the step stopped at, the time the final save ended)."""
    clock = Clock()
    monkeypatch.setattr(stopping, "monotonic", clock)
    stop = StopControl(limit)
    clock.now += 3.0  # set-up counts: the clock starts with the run
    stop.start(checkpoint_bytes=checkpoint_bytes)
    for step, took in enumerate(step_s, start=1):
        clock.now += took
        if step % every == 0:
            with stop.timed("save", step):
                clock.now += save_s
        if stop.should_stop(step, DistEnv()):
            if stop.saved_step != step:
                with stop.timed("save", step):
                    clock.now += save_s
            return step, clock.now
    return len(step_s), clock.now


def test_the_time_limit_leaves_room_for_the_last_save(monkeypatch):
    # 3 s of set-up, 1 s steps, 2 s saves every 5 steps: the estimate is 1.25 * (1 + 2) once a save is measured
    step, ended = _simulate(monkeypatch, 30.0, [1.0] * 100, 2.0, every=5)
    assert (step, ended) == (18, 3 + 18 + 3 * 2 + 2)  # at 17 (26 s), 26 + 3.75 fitted in 30; at 18 (27 s) not
    # before any save is measured: 1 s + the checkpoint's size at 100 MB/s (here 2 s)
    step, ended = _simulate(monkeypatch, 30.0, [1.0] * 100, 3.0, checkpoint_bytes=200_000_000)
    assert (step, ended) == (23, 3 + 23 + 3)  # 26 + 1.25 * (1 + 3) > 30
    # the first step is always taken (nothing is measured before it)
    assert _simulate(monkeypatch, 1.0, [5.0] * 10, 1.0) == (1, 3 + 5 + 1)


def test_the_step_estimate_is_the_longest_of_the_last_20(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(stopping, "monotonic", clock)
    stop = StopControl()
    stop.start()
    for step, took in enumerate([20.0] + [1.0] * 20, start=1):  # a slow first step (warm-up) ages out
        clock.now += took
        assert not stop.should_stop(step, DistEnv())
        assert stop.estimate() == (20.0 if step <= 20 else 1.0) + 1.0


def _validation_scenario(monkeypatch, validates_next: bool) -> tuple[StopControl, bool]:
    clock = Clock()
    monkeypatch.setattr(stopping, "monotonic", clock)
    stop = StopControl(20.0)
    stop.start(checkpoint_bytes=0, validation_excerpts=10)
    clock.now += 2.0
    assert not stop.should_stop(1, DistEnv())
    assert stop.estimate() == 2 + 1 and stop.estimate(validates_next=True) == 2 + 10 * 2 + 1  # a step per excerpt
    with stop.timed("validate"):
        clock.now += 7.0
    clock.now += 2.0
    return stop, stop.should_stop(2, DistEnv(), validates_next=validates_next)  # at 11 s


def test_a_validation_counts_when_the_next_step_has_one(monkeypatch):
    stop, stops = _validation_scenario(monkeypatch, validates_next=False)
    assert stop.estimate(validates_next=True) == 2 + 7 + 1  # measured: the validation's 7 s are not a step's
    assert not stops  # 11 + 1.25 * (2 + 1) <= 20
    assert _validation_scenario(monkeypatch, validates_next=True)[1]  # 11 + 1.25 * (2 + 7 + 1) > 20


def test_signals_stop_after_the_step_and_handlers_are_restored():
    def mine(signum, frame):
        pass

    before, interrupt = signal.signal(signal.SIGTERM, mine), signal.getsignal(signal.SIGINT)
    try:
        with StopControl() as stop:
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            assert signal.getsignal(signal.SIGINT) == stop._handle
            stop.start()
            assert not stop.should_stop(1, DistEnv())
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM is ignored
            assert stop.should_stop(2, DistEnv())
            with pytest.raises(KeyboardInterrupt):  # a second signal that is Ctrl-C aborts at once
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is interrupt
        with pytest.raises(TrainingInterrupted) as e:
            stop.raise_if_interrupted()
        assert (e.value.step, e.value.exit_code) == (2, 143) and "SIGTERM" in str(e.value)
    finally:
        signal.signal(signal.SIGTERM, before)
    with StopControl() as calm:
        calm.start()
        assert not calm.should_stop(1, DistEnv())
    calm.raise_if_interrupted()  # no signal: nothing raised


def test_a_forked_worker_keeps_the_signals_behaviour():
    """DataLoader workers are forked with the handlers: there a signal does what it did before (SIGTERM ends
    the worker, so a loader can terminate it). SIGTERM's default action beforehand: other libraries
    (Ray) may have installed handlers in this process."""
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        _fork_and_terminate()
    finally:
        signal.signal(signal.SIGTERM, before)


def _fork_and_terminate() -> None:
    with StopControl():
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
            finally:
                os._exit(3)  # only if SIGTERM did not end it
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
