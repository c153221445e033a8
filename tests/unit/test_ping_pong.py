"""Ping-pong runner: same greedy tokens as the plain model; halves overlap expert calls."""

import dataclasses

import torch

from actors.engine.engine import EngineSpec, LLMEngine
from actors.weights.loader import load_model
from actors.engine.ping_pong import balanced_cut, split_batch
from actors.engine.sampling_params import SamplingParams
from actors.model.step_batch import StepBatch

PROMPTS = [[5, 6, 7], list(range(40, 61)), [9], list(range(100, 108))]


def run(engine, max_tokens=6):
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return engine.run_to_completion(max_steps=100)


def test_same_greedy_tokens_as_the_plain_model():
    loaded = load_model("preset:tiny-moge", dtype="float32", device="cpu")
    spec = EngineSpec(max_model_len=128, num_kv_blocks=64, block_size=16, max_num_seqs=8)
    plain = run(LLMEngine(loaded, spec))
    engine = LLMEngine(loaded, dataclasses.replace(spec, ping_pong=True))
    calls = []
    real = loaded.model.experts

    from actors.model.expert_compute import ExpertCompute

    class Recording(ExpertCompute):
        def dispatch(self, layer, x, ids, w):
            calls.append((layer, x.shape[0]))
            return real.dispatch(layer, x, ids, w)

    loaded.model.experts = Recording()
    assert run(engine) == plain
    # two micro-batches per layer in multi-sequence steps, interleaved A0 B0 A1 B1 ...
    layers = [layer for layer, _ in calls[:8]]
    assert layers == [0, 0, 1, 1, 2, 2, 3, 3]


def test_split_batch_rebases_rows():
    b = StepBatch(
        input_ids=torch.arange(6), positions=torch.tensor([0, 1, 2, 5, 0, 1]),
        query_start=torch.tensor([0, 3, 4, 6]), context_lens=torch.tensor([3, 6, 2]),
        block_tables=torch.tensor([[0], [1], [2]]), slot_mapping=torch.arange(6) + 10,
        logits_index=torch.tensor([2, 3, 5]),
    )
    cut = balanced_cut(b)
    assert cut == 1
    a, c = split_batch(b, cut)
    assert a.input_ids.tolist() == [0, 1, 2] and a.logits_index.tolist() == [2]
    assert c.query_start.tolist() == [0, 1, 3] and c.logits_index.tolist() == [0, 2]
    assert c.slot_mapping.tolist() == [13, 14, 15] and c.block_tables.tolist() == [[1], [2]]
