"""Tune actors/model/kernels/gemm/ on the GPU: tiles per (op, mode, shape, token bucket) and the path
cut-overs (GEMV vs grouped, weight-only vs W8A8, dense weight-only vs W8A8, bf16 torch._grouped_mm vs
the Triton grouped kernel, Triton vs F.scaled_mm's blockwise W8A8 for the dense linears); writes the table configs.py reads (keyed by the device name).

Each candidate is timed as a CUDA-graph replay (triton.testing.do_bench, median); tiles only change
speed, so the fastest is taken. Compiles dominate (one per tile and kernel variant; shapes reuse
them): the default quick set (about 24 tiles per op and mode) takes a few minutes, --full hours.

  python bench/gemm_autotune.py --shapes qwen3,pangu --out tuned.json      # then copy to
  cp tuned.json actors/model/kernels/gemm/tuned.json                        # the package (commit it)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.model.kernels.gemm import configs  # noqa: E402
from actors.model.kernels.gemm.configs import Tile  # noqa: E402
from actors.model.quant.blocks import quantize  # noqa: E402

# (hidden D, expert width I, experts E, slots K, dense projections (N, K) of the attention part)
SHAPES = {
    "qwen3": (2048, 768, 128, 8, [(4096 + 2 * 512, 2048), (2048, 4096)]),
    "pangu": (5120, 1344, 64, 8, [(5120 + 2 * 1024, 5120), (5120, 5120), (5376, 5120), (5120, 5376)]),
    "bench": (2048, 768, 64, 8, [(4096 + 2 * 512, 2048), (2048, 4096), (1536, 2048), (2048, 1536)]),
}
GROUPED_TOKENS = (16, 32, 64, 128, 256, 512, 2048)
DENSE_TOKENS = (1, 16, 64, 256, 2048)


def candidates(op: str, mode: str, quick: bool) -> list[Tile]:
    bms, bns = (16, 32, 64, 128), (32, 64, 128, 256)
    bks = (64, 128) if mode != "bf16" else (32, 64, 128)
    warps, stages = (4, 8), (2, 3, 4)
    if quick:
        bns, bks, stages = (32, 64, 128), bks[-1:], (3,)
    out = [Tile(*t) for t in itertools.product(bms, bns, bks, warps, stages)]
    return [t for t in out if configs.valid_tile(op, mode, t) and not (t.block_m >= 128 and t.block_n >= 256)]


def bench_us(fn) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1000 * do_bench(graph.replay, warmup=10, rep=40, return_mode="median")


def with_tiles(table: dict, fn):
    """Run fn with configs.tile answering from `table` first."""
    plain = configs.tile

    def tile(op, mode, n, k, tokens, rows_per_block, m_tiles=1):
        t = table.get(configs.tile_key(op, mode, n, k, tokens))
        return t if t is not None else plain(op, mode, n, k, tokens, rows_per_block, m_tiles)

    configs.tile = tile
    try:
        return fn()
    finally:
        configs.tile = plain


def pick(best: dict, key: str, cands: list[Tile], fn, log) -> float:
    """Time fn with each candidate tile at `key` (the rest from `best`); keep the fastest in best.
    -> its time in us (infinity when no candidate ran)."""
    scores = []
    for cand in cands:
        try:
            scores.append((with_tiles({**best, key: cand}, lambda: bench_us(fn)), cand))
        except Exception as exc:  # a tile the compiler cannot fit (shared memory, registers)
            log({"skip": key, "tile": cand.as_list(), "error": type(exc).__name__})
    if not scores:
        return float("inf")
    us, cand = min(scores, key=lambda s: s[0])
    best[key] = cand
    log({"tuned": key, "tile": cand.as_list(), "us": round(us, 1), "tried": len(scores)})
    return us


def tune_shape(name: str, quick: bool, log) -> tuple[dict, dict]:
    from actors.model.kernels.gemm.linear import fp8_linear
    from actors.model.kernels.gemm.moe import expert_outputs
    from actors.model.kernels.moe import fused_moe

    d, inner, e, k, dense = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(e, 2 * inner, d, device="cuda", generator=gen) * d ** -0.5).bfloat16()
    w2 = (torch.randn(e, d, inner, device="cuda", generator=gen) * inner ** -0.5).bfloat16()
    q13, q2 = quantize(w13, split=inner), quantize(w2)
    best: dict[str, Tile] = {}
    timings: dict = {"shape": name}
    for t in GROUPED_TOKENS:
        x = torch.randn(t, d, device="cuda", generator=gen).bfloat16()
        ids = torch.topk(torch.rand(t, e, device="cuda", generator=gen), k).indices
        for mode, (a, b) in (("bf16", (w13, w2)), ("wo", (q13, q2)), ("w8a8", (q13, q2))):
            for op, n_, k_ in (("moe_up", inner, d), ("moe_down", d, inner)):
                pick(best, configs.tile_key(op, mode, n_, k_, t), candidates(op, mode, quick),
                     lambda: expert_outputs(x, a, b, ids, mode=mode), log)
            timings[f"{mode}/{t}"] = with_tiles(best, lambda: bench_us(lambda: expert_outputs(x, a, b, ids, mode=mode)))
        w = torch.rand(t, k, device="cuda", generator=gen)
        timings[f"torch_bf16/{t}"] = bench_us(lambda: fused_moe(x, w13, w2, ids, w, e // 8, 8, gemv_max_tokens=0))
    for t in (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(t, d, device="cuda", generator=gen).bfloat16()
        ids = torch.topk(torch.rand(t, e, device="cuda", generator=gen), k).indices
        timings[f"gemv/{t}"] = bench_us(lambda: expert_outputs(x, q13, q2, ids, mode="gemv"))
        if t >= 16:
            timings[f"wo_small/{t}"] = with_tiles(best, lambda: bench_us(lambda: expert_outputs(x, q13, q2, ids, mode="wo")))
    for n_, k_ in dense:
        wq = quantize((torch.randn(n_, k_, device="cuda", generator=gen) * k_ ** -0.5).bfloat16())
        for t in DENSE_TOKENS:
            x = torch.randn(t, k_, device="cuda", generator=gen).bfloat16()
            for mode in ("wo", "w8a8"):
                timings[f"dense/{mode}/{n_}x{k_}/{t}"] = pick(
                    best, configs.tile_key("dense", mode, n_, k_, t), candidates("dense", mode, quick),
                    lambda: fp8_linear(x, wq.q, wq.scale, mode=mode), log)
            timings[f"dense/scaled_mm/{n_}x{k_}/{t}"] = scaled_mm_us(x, wq, best, log)
    return best, timings


def scaled_mm_us(x, wq, best, log) -> float:
    """F.scaled_mm's blockwise W8A8 on this shape: its time if this build runs it and it agrees with
    the Triton kernel (2% relative), else infinity (never selected)."""
    from actors.model.kernels.gemm.linear import fp8_linear, scaled_mm_blockwise, scaled_mm_fits

    if not scaled_mm_fits(wq.q):
        return float("inf")
    try:
        got = scaled_mm_blockwise(x, wq.q, wq.scale, None)
        want = with_tiles(best, lambda: fp8_linear(x, wq.q, wq.scale, mode="w8a8"))
        err = float((got.float() - want.float()).norm() / want.float().norm())
        if err > 0.02:
            log({"scaled_mm": list(wq.shape), "tokens": x.shape[0], "rejected_rel_err": err})
            return float("inf")
        return bench_us(lambda: scaled_mm_blockwise(x, wq.q, wq.scale, None))
    except Exception as exc:  # not in this build / not on this GPU
        log({"scaled_mm": list(wq.shape), "tokens": x.shape[0], "unavailable": f"{type(exc).__name__}: {exc}"[:200]})
        return float("inf")


def cutovers(all_timings: list[dict]) -> dict:
    """The path settings from the timings, summed over the tuned shapes."""
    def total(key):
        return sum(t.get(key, 0.0) for t in all_timings)

    gemv_max = max([t for t in (1, 2, 4, 8, 16, 32, 64) if t < 16 or total(f"gemv/{t}") <= total(f"wo_small/{t}")], default=16)
    w8a8_min = next((t for t in GROUPED_TOKENS if total(f"w8a8/{t}") < total(f"wo/{t}")), 1 << 30)
    dense_keys = {k.split("/")[2] for t in all_timings for k in t if k.startswith("dense/")}
    dense_min = next((t for t in DENSE_TOKENS if sum(total(f"dense/w8a8/{s}/{t}") for s in dense_keys)
                      < sum(total(f"dense/wo/{s}/{t}") for s in dense_keys)), 1 << 30)
    triton_wins = sum(total(f"bf16/{t}") < total(f"torch_bf16/{t}") for t in GROUPED_TOKENS)
    big = [t for t in DENSE_TOKENS if t >= min(dense_min, DENSE_TOKENS[-1])]
    mm_wins = sum(sum(total(f"dense/scaled_mm/{s}/{t}") for s in dense_keys)
                  < sum(total(f"dense/w8a8/{s}/{t}") for s in dense_keys) for t in big)
    # "W8A8 from t tokens" becomes "above t - 1" (configs.w8a8 rounds it up to a graph bucket)
    return {"gemv_max_tokens": gemv_max, "w8a8_over_tokens": w8a8_min - 1, "dense_w8a8_over_tokens": dense_min - 1,
            "bf16_grouped": "triton" if triton_wins > len(GROUPED_TOKENS) // 2 else "torch",
            "dense_w8a8_backend": "scaled_mm" if mm_wins > len(big) // 2 else "triton"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3,pangu")
    ap.add_argument("--full", action="store_true", help="every tile (hours); default: the quick set (minutes)")
    ap.add_argument("--out", default="tuned.json")
    args = ap.parse_args()
    started = time.perf_counter()

    def log(row):
        print(json.dumps({**row, "t": round(time.perf_counter() - started, 1)}), flush=True)

    tiles, timings = {}, []
    for name in args.shapes.split(","):
        best, t = tune_shape(name, not args.full, log)
        tiles.update(best)
        timings.append(t)
        log({"timings": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in t.items()}})
    entry = {**cutovers(timings), "tiles": {k: v.as_list() for k, v in sorted(tiles.items())}}
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.is_file() else {}
    table[torch.cuda.get_device_name()] = entry
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    log({"written": str(out), **{k: v for k, v in entry.items() if k != "tiles"}})


if __name__ == "__main__":
    main()
