"""Our model loaded from transformers' save_pretrained output computes what transformers computes:
prompt logits within float32 tolerance and the same greedy continuation."""

from __future__ import annotations

import pytest
import torch

from actors.weights.loader import load_model
from actors.model.reference import greedy_reference, one_sequence_batch
from actors.model.kv_cache import PagedKVCache

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
PROMPT = [5, 17, 99, 3, 64, 2 + 40, 77, 11, 120, 8]


def _all_position_logits(loaded, prompt: list[int]) -> torch.Tensor:
    """[S, V] logits of every prompt position from one prefill step."""
    kv = PagedKVCache.for_model(loaded.cfg, 4, 16, torch.float32, "cpu")
    batch = one_sequence_batch(prompt, 0, torch.arange(4), "cpu")
    batch.logits_index = torch.arange(len(prompt))
    return loaded.model(batch, kv)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_logits_match_transformers(hf_moe_checkpoints, family):
    ckpt = hf_moe_checkpoints[family]
    loaded = load_model(str(ckpt.path), dtype="float32", device="cpu")
    assert loaded.cfg.family == family
    with torch.no_grad():
        expected = ckpt.model(torch.tensor([PROMPT])).logits[0]
    got = _all_position_logits(loaded, PROMPT)
    assert expected.abs().max() > 1.0  # a non-degenerate model, or the comparison means little
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_transformers_generate(hf_moe_checkpoints, family):
    ckpt = hf_moe_checkpoints[family]
    loaded = load_model(str(ckpt.path), dtype="float32", device="cpu")
    with torch.no_grad():
        out = ckpt.model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=12)
    expected = out[0, len(PROMPT) :].tolist()
    assert greedy_reference(loaded, PROMPT, 12) == expected


def test_qwen2_moe_dense_layer_and_shared_expert_are_used(hf_moe_checkpoints):
    loaded = load_model(str(hf_moe_checkpoints["qwen2_moe"].path), dtype="float32", device="cpu")
    cfg = loaded.cfg
    assert cfg.dense_layers == (1,) and not loaded.model.layers[1].is_moe
    assert cfg.shared_expert_gate and cfg.attention_bias
    assert 1 not in loaded.expert_groups[0].w13  # no routed experts for the dense layer
