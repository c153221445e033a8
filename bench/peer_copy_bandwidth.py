"""How fast one expert worker can copy groups from another: gRPC ExportGroups stream vs Ray's
object store with raw numpy buffers (what ExpertWorker.load_groups(peer=...) uses).

  PYTHONPATH=. python bench/peer_copy_bandwidth.py [--mib-per-group 288] [--repeats 2]
Prints one JSON line per (path, repeat) with MiB/s. Same process layout for both: the holder is a
Ray actor on this machine, the reader is the driver.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS, EXPERTS, D, I = 4, 8, 2048, 768  # bf16 group shards of a Qwen3-30B-A3B-like width


class _Holder:
    """A stand-in worker holding `groups` random bf16 groups, serving both copy paths."""

    worker_id = "holder"

    def __init__(self, groups: int, scale: int) -> None:
        from actors.experts.carriers.grpc_server import GrpcExpertServer

        g = torch.Generator().manual_seed(0)
        shape13, shape2 = (EXPERTS * scale, 2 * I, D), (EXPERTS * scale, D, I)
        self.data = {
            grp: {"group": grp, "first_expert": grp * EXPERTS * scale,
                  "w13": {l: torch.randn(shape13, generator=g).to(torch.bfloat16) for l in range(LAYERS)},
                  "w2": {l: torch.randn(shape2, generator=g).to(torch.bfloat16) for l in range(LAYERS)}}
            for grp in range(groups)
        }
        self.server = GrpcExpertServer(self, "127.0.0.1", {})

    def export_groups(self, groups):
        return {g: self.data[g] for g in groups}

    def export_groups_raw(self, groups):
        from actors.experts.carriers.codec import to_host_buffer

        return {g: {**d, "w13": {l: to_host_buffer(t) for l, t in d["w13"].items()},
                    "w2": {l: to_host_buffer(t) for l, t in d["w2"].items()}} for g, d in self.export_groups(groups).items()}

    def held_groups(self):
        return sorted(self.data)

    def endpoint(self):
        return self.server.address()

    def nbytes(self) -> int:
        return sum(t.numel() * 2 for d in self.data.values() for n in ("w13", "w2") for t in d[n].values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--scale", type=int, default=1, help="experts per group = 8 x scale")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from actors.experts.group_sources import weights_from_raw
    from actors.experts.carriers.grpc_call import fetch_groups

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    holder = ray.remote(_Holder).remote(args.groups, args.scale)
    groups = list(range(args.groups))
    mib = ray.get(holder.nbytes.remote()) / 2**20
    endpoint = ray.get(holder.endpoint.remote())
    paths = {
        "grpc-stream": lambda: fetch_groups(endpoint, groups),
        "ray-object-store": lambda: {g: weights_from_raw(d) for g, d in ray.get(holder.export_groups_raw.remote(groups)).items()},
    }
    for name, copy in paths.items():
        for r in range(args.repeats):
            t0 = time.perf_counter()
            copy()
            dt = time.perf_counter() - t0
            print(json.dumps({"path": name, "repeat": r, "mib": round(mib), "seconds": round(dt, 3),
                              "mib_per_s": round(mib / dt)}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
