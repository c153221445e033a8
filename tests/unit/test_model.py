"""The model on paged KV: batching, chunked prefill and the per-layer pieces all give the logits of
one sequence run alone; the expert seam is swappable."""

from __future__ import annotations

import torch

from actors.model.expert_compute import Done, ExpertCompute
from actors.model.kv_cache import PagedKVCache
from actors.weights.loader import load_model
from actors.model.reference import greedy_reference, one_sequence_batch
from actors.model.step_batch import StepBatch

BS = 16


def _tiny():
    return load_model("preset:tiny-moge", dtype="float32", device="cpu")


def _alone_logits(loaded, prompt):
    kv = PagedKVCache.for_model(loaded.cfg, 4, BS, torch.float32, "cpu")
    return loaded.model(one_sequence_batch(prompt, 0, torch.arange(4), "cpu"), kv)[0]


def _batch(seqs: list[tuple[list[int], int, list[int]]]) -> StepBatch:
    """seqs: (new ids, start position, block table)."""
    ids, pos, slots, starts, ctx, last = [], [], [], [0], [], []
    width = max(len(bt) for _, _, bt in seqs)
    for new, start, table in seqs:
        p = list(range(start, start + len(new)))
        ids += new
        pos += p
        slots += [table[q // BS] * BS + q % BS for q in p]
        starts.append(starts[-1] + len(new))
        ctx.append(start + len(new))
        last.append(starts[-1] - 1)
    tables = [bt + [0] * (width - len(bt)) for _, _, bt in seqs]
    return StepBatch(*(torch.tensor(v) for v in (ids, pos, starts, ctx, tables, slots, last)))


def test_batched_mixed_step_equals_sequences_alone():
    loaded = _tiny()
    a, b, c = list(range(10, 30)), [1, 2, 3], list(range(40, 75))  # c spans 3 blocks
    kv = PagedKVCache.for_model(loaded.cfg, 12, BS, torch.float32, "cpu")
    # step 1: prefill a and b; c's first chunk (chunked prefill)
    batch = _batch([(a, 0, [3, 4]), (b, 0, [7]), (c[:20], 0, [1, 9, 2])])
    loaded.model(batch, kv)
    # step 2: decode a and b, the rest of c
    logits = loaded.model(_batch([([5], 20, [3, 4]), ([6], 3, [7]), (c[20:], 20, [1, 9, 2])]), kv)
    torch.testing.assert_close(logits[0], _alone_logits(loaded, a + [5]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], _alone_logits(loaded, b + [6]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[2], _alone_logits(loaded, c), atol=1e-5, rtol=1e-5)


def test_per_layer_pieces_compose_to_forward():
    loaded = _tiny()
    model, prompt = loaded.model, [9, 8, 7, 6, 5]
    kv = PagedKVCache.for_model(loaded.cfg, 2, BS, torch.float32, "cpu")
    batch = one_sequence_batch(prompt, 0, torch.arange(2), "cpu")
    h = model.embed(batch.input_ids)
    for layer in range(loaded.cfg.num_layers):
        h, x = model.attention_block(layer, h, batch, kv)
        ids, w = model.route(layer, x)
        h = model.finish_moe(layer, h, x, model.experts.dispatch(layer, x, ids, w).wait())
    torch.testing.assert_close(model.head(h, batch.logits_index)[0], _alone_logits(loaded, prompt))


class _Recording(ExpertCompute):
    """An ExpertCompute that forwards to another and records what it was sent."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def dispatch(self, layer, x, ids, w):
        self.calls.append((layer, tuple(ids.shape)))
        return Done(self.inner.dispatch(layer, x, ids, w).wait())


def test_experts_are_swappable_and_see_every_moe_layer():
    loaded = _tiny()
    prompt = [1, 2, 3, 4]
    expected = greedy_reference(loaded, prompt, 3, stop_at_eos=False)
    loaded.model.experts = _Recording(loaded.model.experts)
    assert greedy_reference(loaded, prompt, 3, stop_at_eos=False) == expected
    cfg = loaded.cfg
    assert loaded.model.experts.calls[: cfg.num_layers] == [(l, (4, cfg.top_k)) for l in range(cfg.num_layers)]


def test_preset_is_deterministic_and_seed_dependent():
    a, b = _tiny(), _tiny()
    other = load_model("preset:tiny-moge", dtype="float32", device="cpu", seed=1)
    prompt = [5, 6, 7]
    assert torch.equal(_alone_logits(a, prompt), _alone_logits(b, prompt))
    assert not torch.allclose(_alone_logits(a, prompt), _alone_logits(other, prompt))
    assert a.bytes_loaded == a.attention_bytes + a.expert_bytes > 0
