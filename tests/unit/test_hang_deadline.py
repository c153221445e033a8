"""The controller's hang deadline follows how fast workers answer, within its floor and ceiling."""

from cluster.elastic.control.liveness import HangDeadline


def test_deadline_is_factor_times_the_slowest_recent_answer_within_bounds():
    d = HangDeadline(factor=10, floor_s=2.5, ceiling_s=5.0, samples=3)
    assert d.seconds() == 5.0  # nothing measured: the old fixed timeout
    d.record(0.01)
    assert d.seconds() == 2.5  # fast answers: the floor, not 0.1 s (a loaded CI machine stalls that long)
    d.record(0.3)
    assert d.seconds() == 3.0
    d.record(2.0)
    assert d.seconds() == 5.0  # never more patient than the ceiling
    for _ in range(3):
        d.record(0.02)
    assert d.seconds() == 2.5  # the slow answer left the window
