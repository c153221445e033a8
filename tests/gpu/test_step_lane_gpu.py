"""The NCCL step lane on two GPUs, no Ray: attention on cuda:0, every expert group in a worker
process on cuda:1 (CUDA graphs per bucket on both sides: the replica's decode steps with the
lane's NCCL ops inside, the worker's layer loops). Greedy tokens equal the single-process model's,
with and without ping-pong, for tiny-moge and a tiny Qwen3-MoE checkpoint. Skips below 2 GPUs.

    python -m pytest tests/gpu/test_step_lane_gpu.py -q
"""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import write_qwen3_moe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

PROMPTS = [[(5 * i + j) % 120 for j in range(n)] for i, n in enumerate([1, 7, 19, 3])]


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory):
    return write_qwen3_moe(tmp_path_factory.mktemp("qwen3_moe"))


def greedy(engine) -> dict:
    from actors.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    return engine.run_to_completion(max_steps=100)


@pytest.mark.parametrize("model", ["tiny-moge", "qwen3-moe"])
def test_nccl_step_lane_tokens_match_single_process(model, request):
    from actors.experts.dispatch.dispatcher import Dispatcher
    from actors.experts.lane.step_lane import LaneCarrier
    from actors.experts.lane_pair import NoCarrier, spawn_worker
    from actors.experts.placement import pack_groups
    from actors.experts.worker.spec import model_config_of
    from actors.engine.build import EngineSettings, LoadSpec, build_engine

    source = "preset:tiny-moge" if model == "tiny-moge" else request.getfixturevalue("qwen3_checkpoint")
    n_groups = None if model == "tiny-moge" else 4
    torch.cuda.set_device(0)

    load = LoadSpec(source, "bfloat16", "cuda", n_groups=n_groups, max_model_len=128)

    def settings(ping_pong: bool):  # plain settings: no pydantic or Ray needed on the device
        return EngineSettings(max_num_seqs=8, num_kv_blocks=64, ping_pong=ping_pong)

    reference = greedy(build_engine(load, settings(False))[0])
    spec = {"source": source, "dtype": "bfloat16", "device": "cuda:1", "n_groups": n_groups, "seed": 0}
    cfg = model_config_of(spec)
    with spawn_worker(spec, list(range(cfg.n_groups))) as ref:
        for ping_pong in (False, True):
            lanes = LaneCarrier("cuda:0", timeout_s=60)
            experts = Dispatcher(cfg, NoCarrier(), pack_groups(cfg.n_groups, ["w0"]), {"w0": ref}, step_carrier=lanes)
            engine, _ = build_engine(load, settings(ping_pong), experts)
            assert greedy(engine) == reference, f"ping_pong={ping_pong}"
            assert lanes.backends() == {"nccl"}
            assert ref.local.lane_stats()["lanes"] == 1  # ping-pong too: one lane (communicator)
            m = experts.metrics()
            assert m["graph_replays"] > 0 and m["link_failures"] == 0  # replica decode steps replayed
            experts.close()
        stats = ref.local.lane_stats()
        assert stats["steps"] > 0 and stats["graph_replays"] > 0  # decode steps replayed captured loops
