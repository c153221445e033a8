"""What the ingress hop costs per token: the split app (proxy -> ingress -> attention replica) with
each piece carrier — "socket" (the piece channel: one connection per ingress/replica pair, a step's
pieces in one frame) and "serve" (a Serve streaming call per request, a Ray message per piece) —
against the same replica answering HTTP itself (proxy -> replica, the pre-split topology), on the
same local Ray, alternating, at 1 and 32 concurrent greedy streams.

    PYTHONPATH=. python bench/ingress_hop.py --streams 1,32 --tokens 64 --rounds 3 --out ingress_hop.json

ITL here is what a client sees: the mean gap between consecutive tokens of a stream (first token
excluded), averaged over streams. Wall-clock ITL on a shared machine is noisier than the hop, so the
hop's cost is also measured as CPU: the CPU seconds the serving processes (Serve proxy, ingress,
attention replica; /proc/<pid>/stat) spend per generated token in each topology. `hop_cpu_ms` =
split - direct per token; `hop_share` = hop_cpu_ms / the direct ITL (what the hop takes from a
token's budget on a CPU-bound machine, where every CPU millisecond delays the engine); `itl_share` =
the wall ITL's excess over direct, relative to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import httpx

from cluster.cli.local_cluster import APP_NAME as APP, LocalCluster, free_port
from cluster.config import MogeConfig


def direct_app(config: MogeConfig):
    """The pre-split topology: one deployment, its HTTP app in process over the same server half."""
    from ray import serve

    from cluster.serve.app import AttentionReplica, deployment_options
    from cluster.serve.ingress.http_app import build_http_app
    from cluster.serve.middleware.request_guard import GuardLimits

    class DirectReplica(AttentionReplica):
        def __serve_build_asgi_app__(self):
            return build_http_app(self.server, limits=GuardLimits.from_settings(self.config.server,
                                                                                self.config.engine.max_num_seqs))

    cls = serve.ingress()(DirectReplica)
    return serve.deployment(cls, name="DirectReplica", **deployment_options(config)).bind(config.model_dump(mode="json"))


def serving_pids(app: str) -> list[int]:
    import ray

    names = {f"ServeReplica:{app}:Ingress", f"ServeReplica:{app}:AttentionReplica", f"ServeReplica:{app}:DirectReplica",
             "ProxyActor"}
    return [a["Pid"] for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"] in names and a["Pid"]]


def cpu_s(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / ticks


async def itl(base_url: str, streams: int, tokens: int) -> float:
    body = {"model": "tiny-moge", "prompt": "the ingress hop", "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "return_token_ids": True}

    async def one(c: httpx.AsyncClient) -> float:
        stamps: list[float] = []
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        stamps += [time.perf_counter()] * len(choice.get("token_ids") or [])
        gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
        return statistics.mean(gaps)

    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=httpx.Limits(max_connections=256)) as c:
        return statistics.mean(await asyncio.gather(*(one(c) for _ in range(streams))))


TOPOLOGIES = ("direct", "socket", "serve")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="1,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from ray import serve

    from cluster.serve.app import app_builder

    config = MogeConfig.load(env={}, model={"source": "preset:tiny-moge", "device": "cpu", "dtype": "float32"},
                             engine={"max_num_seqs": 32}, server={"host": "127.0.0.1", "port": free_port()})
    cluster = LocalCluster(config, num_cpus=6)
    base = cluster.start(timeout_s=300)  # the socket carrier: the default
    over_serve = config.model_dump(mode="json")
    over_serve["server"]["piece_carrier"] = "serve"
    serve.run(app_builder({"config": over_serve}), name="serve", route_prefix="/serve")
    serve.run(direct_app(config), name="direct", route_prefix="/direct")
    urls = {"socket": base, "serve": base + "/serve", "direct": base + "/direct"}
    apps = {"socket": APP, "serve": "serve", "direct": "direct"}
    rows: list[dict[str, Any]] = []
    try:
        for n in [int(x) for x in args.streams.split(",")]:
            for name in TOPOLOGIES:  # warm every path
                asyncio.run(itl(urls[name], n, 8))
            wall: dict[str, list[float]] = {t: [] for t in TOPOLOGIES}
            cpu: dict[str, list[float]] = {t: [] for t in TOPOLOGIES}
            for _ in range(args.rounds):
                for name in TOPOLOGIES:
                    pids = serving_pids(apps[name])
                    before = cpu_s(pids)
                    wall[name].append(asyncio.run(itl(urls[name], n, args.tokens)))
                    cpu[name].append((cpu_s(pids) - before) / (n * args.tokens))
            d, cd = statistics.median(wall["direct"]), statistics.median(cpu["direct"])
            row: dict[str, Any] = {"streams": n, "itl_direct_ms": round(d * 1e3, 3),
                                   "cpu_per_token_direct_ms": round(cd * 1e3, 3)}
            for name in ("socket", "serve"):
                s, cs = statistics.median(wall[name]), statistics.median(cpu[name])
                row.update({f"itl_{name}_ms": round(s * 1e3, 3), f"cpu_per_token_{name}_ms": round(cs * 1e3, 3),
                            f"hop_cpu_{name}_ms": round((cs - cd) * 1e3, 3),
                            f"hop_share_{name}": round((cs - cd) / d, 4), f"itl_share_{name}": round((s - d) / d, 4)})
            row["rounds_ms"] = {t: [round(x * 1e3, 2) for x in wall[t]] for t in TOPOLOGIES}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        serve.delete("direct")
        serve.delete("serve")
        cluster.stop()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
