"""Locust LoadTestShape classes for the traffic curves of loadtest/traffic_curves.py.

Imported only inside the locust process (it imports locust, which monkey-patches with gevent).
Each class reads its peak users and duration from MOGE_LOADTEST_USERS / MOGE_LOADTEST_DURATION_S.
"""

from __future__ import annotations

import os

from locust import LoadTestShape

from loadtest import traffic_curves as tc


class _CurveShape(LoadTestShape):
    abstract = True
    curve_name = ""

    def __init__(self) -> None:
        super().__init__()
        self.curve = tc.make_curve(
            self.curve_name,
            int(os.environ.get(tc.ENV_USERS, "4")),
            float(os.environ.get(tc.ENV_DURATION, "30")),
        )

    def tick(self) -> tuple[int, float] | None:
        users = self.curve.users_at(self.get_run_time())
        return None if users is None else (users, self.curve.spawn_rate())


class ConstantShape(_CurveShape):
    curve_name = "constant"


class StepShape(_CurveShape):
    curve_name = "step"


class SpikeShape(_CurveShape):
    curve_name = "spike"


class RampShape(_CurveShape):
    curve_name = "ramp"


class DiurnalShape(_CurveShape):
    curve_name = "diurnal"


SHAPES: dict[str, type[_CurveShape]] = {
    cls.curve_name: cls for cls in (ConstantShape, StepShape, SpikeShape, RampShape, DiurnalShape)
}
