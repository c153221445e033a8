"""The model on an accelerator: the grouped-matmul expert kernel agrees with the per-expert path,
and the benchmark preset loads and decodes in bf16."""

from __future__ import annotations

import time

import pytest
import torch

from actors.model import experts as experts_module
from actors.device import synchronize
from actors.model.experts import group_forward
from actors.weights.loader import load_model, random_expert_groups
from actors.model.presets import PRESETS
from actors.model.reference import greedy_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_expert_paths_agree(monkeypatch):
    """Fused grouped-matmul path, fused GEMV path, torch grouped_mm path and the per-expert loop."""
    from actors.model import kernels
    from actors.model.kernels.moe import fused_moe

    cfg = PRESETS["bench-moge"]
    g = random_expert_groups(cfg, [5], seed=0, dtype=torch.bfloat16, device="cuda")[5]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, cfg.hidden_size, device="cuda", generator=gen).bfloat16()
    ids = torch.randint(0, cfg.experts_per_group, (512, 1), device="cuda", generator=gen)
    w = torch.rand(512, 1, device="cuda", generator=gen)
    eg = cfg.experts_per_group
    grouped = fused_moe(x, g.w13[0], g.w2[0], ids, w, eg, 1, gemv_max_tokens=0)
    gemv = fused_moe(x, g.w13[0], g.w2[0], ids, w, eg, 1, gemv_max_tokens=1 << 20)
    kernels.set_enabled(False)
    try:
        torch_grouped = group_forward(g.w13[0], g.w2[0], x, ids, w)
        monkeypatch.setattr(experts_module, "_grouped_mm_usable", lambda x: False)
        loop = group_forward(g.w13[0], g.w2[0], x, ids, w)
    finally:
        kernels.set_enabled(True)
    for got in (grouped, gemv, torch_grouped):
        torch.testing.assert_close(got.float(), loop.float(), atol=2e-2, rtol=2e-2)


def test_bench_preset_loads_and_decodes_in_bf16():
    started = time.perf_counter()
    loaded = load_model("preset:bench-moge", dtype="auto", device="cuda")
    synchronize(loaded.device)
    load_s = time.perf_counter() - started
    assert loaded.dtype == torch.bfloat16
    prompt = list(range(100, 164))
    tokens = greedy_reference(loaded, prompt, 16, stop_at_eos=False)
    assert len(tokens) == 16 and all(0 <= t < loaded.cfg.vocab_size for t in tokens)
    assert tokens == greedy_reference(loaded, prompt, 16, stop_at_eos=False)
    print(f"bench-moge: load {load_s:.1f}s, {loaded.bytes_loaded / 2**30:.2f} GiB held")
