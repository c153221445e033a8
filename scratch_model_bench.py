import time, torch
from actors.model_loader import load_model
from actors.kv_cache import PagedKVCache
from actors.step_batch import StepBatch
lm = load_model("preset:bench-moge", device="cuda")
cfg = lm.cfg; BS = 16
for B, ctx in [(1, 512), (64, 512), (256, 1024)]:
    nblk = ctx // BS
    kv = PagedKVCache.for_model(cfg, B * nblk + 1, BS, torch.bfloat16, "cuda")
    tables = torch.arange(B * nblk, device="cuda").view(B, nblk)
    pos = torch.full((B,), ctx - 1, device="cuda")
    batch = StepBatch(torch.randint(0, 1000, (B,), device="cuda"), pos, torch.arange(B + 1, device="cuda"),
                      pos + 1, tables, tables[:, -1] * BS + (ctx - 1) % BS, torch.arange(B, device="cuda"))
    for _ in range(3): lm.model(batch, kv)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): lm.model(batch, kv)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
    # experts only
    x = torch.randn(B, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    ids, w = lm.model.route(0, x)[1:]
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): lm.model.experts.dispatch(0, x, ids, w).wait()
    torch.cuda.synchronize(); de = (time.perf_counter() - t) / 10
    print(f"decode B={B} ctx={ctx}: step {dt*1e3:.1f} ms, experts/layer {de*1e3:.2f} ms, {B/dt:.0f} tok/s")
# prefill
P = 2048
kv = PagedKVCache.for_model(cfg, P // BS, BS, torch.bfloat16, "cuda")
tables = torch.arange(P // BS, device="cuda").view(1, -1)
pos = torch.arange(P, device="cuda")
batch = StepBatch(torch.randint(0, 1000, (P,), device="cuda"), pos, torch.tensor([0, P], device="cuda"),
                  torch.tensor([P], device="cuda"), tables, pos, torch.tensor([P - 1], device="cuda"))
for _ in range(2): lm.model(batch, kv)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(5): lm.model(batch, kv)
torch.cuda.synchronize(); print(f"prefill {P}: {(time.perf_counter()-t)/5*1e3:.1f} ms")
