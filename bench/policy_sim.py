"""Replay a traffic trace through an autoscaling policy and plot devices and latency (PNG).

  PYTHONPATH=. python bench/policy_sim.py --shape diurnal --policy utilisation --out out/policy_sim.png
  PYTHONPATH=. python bench/policy_sim.py --trace my_trace.csv --config moge.yaml   # CSV: t,rps

The policy and its knobs come from the config's elastic.policy section (--policy overrides the name).
"""

from __future__ import annotations

import argparse
import json

from cluster.config import MogeConfig
from cluster.elastic.policy.policies import make_policy
from cluster.elastic.policy.sim import CapacityModel, SimClock, load_trace, plot, shape_trace, simulate, summary
from cluster.elastic.policy.guarded import guarded_from_config


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--trace", help="CSV of t_seconds,rps")
    src.add_argument("--shape", default="diurnal", choices=["step", "ramp", "spike", "diurnal"])
    ap.add_argument("--duration", type=float, default=1800, help="seconds, for --shape")
    ap.add_argument("--peak-rps", type=float, default=10.0)
    ap.add_argument("--config", help="YAML config; its elastic.policy section is used")
    ap.add_argument("--policy", choices=["utilisation", "slo", "schedule", "none"])
    ap.add_argument("--rps-per-device", type=float, default=2.0)
    ap.add_argument("--scale-up-delay", type=float, default=15.0, help="seconds from decision to serving")
    ap.add_argument("--out", default="out/policy_sim.png")
    args = ap.parse_args(argv)

    cfg = MogeConfig.load(args.config)
    section = cfg.elastic.policy
    if args.policy:
        section = section.model_copy(update={"name": args.policy})
    trace = load_trace(args.trace) if args.trace else shape_trace(args.shape, args.duration, args.peak_rps)
    model = CapacityModel(rps_per_device=args.rps_per_device, scale_up_delay_s=args.scale_up_delay,
                          start_devices=section.min_devices)
    clock = SimClock(trace[0][0])
    guarded = guarded_from_config(section, make_policy(section), clock)
    steps = simulate(trace, guarded, clock, model, tick_s=section.period_s, window_s=section.window_s)
    name = args.trace or args.shape
    png = plot(steps, args.out, f"{section.name} policy, {name} trace", section.ttft_p99_ms, section.itl_p99_ms,
               model.rps_per_device)
    result = {"png": str(png), **summary(steps, section.ttft_p99_ms)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
