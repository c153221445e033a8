"""Which path and which tiles the GEMM kernels take, per shape and token count: a table, not code.

Every choice here changes only speed (and, for the activation scheme, FP8 rounding of activations):
    gemv_max_tokens      routed experts: per-(token, expert) GEMV up to this many tokens, grouped above
    w8a8_over_tokens     routed experts, grouped path: activations quantized to FP8 per token group of
                         128 (W8A8) above this many tokens; up to it, kept in the compute dtype
                         (weight-only). Read as a multiple of 64 in [64, 1024] (`w8a8`), so a step and
                         the CUDA-graph bucket it is padded to take the same scheme
    dense_w8a8_over_tokens  the same cut-over for the dense FP8 linears (attention, shared expert)
    bf16_grouped         routed experts in bf16, grouped path: "torch" (torch._grouped_mm) or "triton"
                         (this package's grouped kernel with the tile table)
    dense_w8a8_backend   the dense FP8 linears' W8A8: "triton" or "scaled_mm" (F.scaled_mm blockwise)
    tiles                "<op>/<mode>/<N>x<K>/<tokens bucket>" -> [BLOCK_M, BLOCK_N, BLOCK_K, warps, stages]

The defaults below are starting points, not measurements. `bench/gemm_autotune.py` measures every
candidate on the GPU and writes `tuned.json` beside this file, keyed by the device name
(torch.cuda.get_device_name()); what it holds for the running device replaces the defaults. Environment
overrides (MOGE_GEMM_<KEY>=value, e.g. MOGE_GEMM_GEMV_MAX_TOKENS=32) win over both, for measuring.
Tile choices are read on the host when a step is launched (the warm-up before graph capture fixes
them), never inside a captured graph.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

TUNED_FILE = Path(__file__).with_name("tuned.json")

DEFAULTS = {
    "gemv_max_tokens": 16,
    "w8a8_over_tokens": 64,
    "dense_w8a8_over_tokens": 64,
    "bf16_grouped": "torch",
    "dense_w8a8_backend": "triton",
}
# tokens buckets a tile entry is keyed by (a step's token count rounds up to the next one)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SMS = 132  # streaming multiprocessors the defaults size grids for (H100 / H200)
OPS = ("moe_up", "moe_down", "dense")  # gate/up + SiLU-mul, down projection, dense linear
MODES = ("bf16", "wo", "w8a8")  # dense weights; FP8 weights x compute-dtype activations; FP8 x FP8


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 3

    def as_list(self) -> list[int]:
        return [self.block_m, self.block_n, self.block_k, self.warps, self.stages]


def bucket(tokens: int) -> int:
    return next((b for b in TOKEN_BUCKETS if b >= tokens), TOKEN_BUCKETS[-1])


def tile_key(op: str, mode: str, n: int, k: int, tokens: int) -> str:
    return f"{op}/{mode}/{n}x{k}/{bucket(tokens)}"


def default_tile(op: str, mode: str, rows_per_block: int, n: int = 4096, m_tiles: int = 1) -> Tile:
    """rows_per_block: rows one M tile sees (tokens for dense, about tokens*K/E for the experts);
    m_tiles: about how many M tiles carry rows. FP8 modes take BLOCK_K = 128 (one weight-scale column
    per step); W8A8's gate/up pass takes BLOCK_N = 128 (its epilogue quantizes one activation group
    per tile). Decode is bandwidth-bound: BLOCK_N is the widest that still gives every SM about two
    programs (weights are read once per M tile, so narrow tiles cost no extra bytes)."""
    bm = 16 if rows_per_block <= 16 else 32 if rows_per_block <= 32 else 64 if rows_per_block <= 64 else 128
    bk = 128 if mode != "bf16" else 64
    if op == "moe_up" and mode == "w8a8":
        return Tile(bm, 128, 128, 4 if bm <= 32 else 8, 3)
    # the gate/up pass keeps two accumulators (gate and up tiles): at most 64 columns per program
    widest = 64 if op == "moe_up" else 128
    bn = next((b for b in (128, 64, 32) if b <= widest and m_tiles * -(-n // b) >= 2 * SMS), 16)
    warps = 8 if bm * bn >= 128 * 64 else 4
    return Tile(bm, bn, bk, warps, 3 if mode != "bf16" else 4)


def valid_tile(op: str, mode: str, tile: Tile) -> bool:
    if tile.block_m < 16 or tile.block_n < 16 or tile.block_k < 16:
        return False
    if mode != "bf16" and 128 % tile.block_k:
        return False
    return not (op == "moe_up" and mode == "w8a8" and tile.block_n != 128)


@functools.cache
def _tuned() -> dict:
    if not TUNED_FILE.is_file() or not torch.cuda.is_available():
        return {}
    table = json.loads(TUNED_FILE.read_text())
    return table.get(torch.cuda.get_device_name(), {})


def setting(key: str):
    env = os.environ.get(f"MOGE_GEMM_{key.upper()}")
    default = DEFAULTS[key]
    if env is not None:
        return type(default)(env)
    return _tuned().get(key, default)


# Largest token count that takes the routed experts' GEMV path in bf16 (kernels/moe.py). On the H200,
# Qwen3-30B-A3B layer shape (bench/kernel_check.py, docs/performance.md): GEMV 278 us vs grouped
# 350 us at 16 tokens, even at 32.
MOE_GEMV_MAX_TOKENS = int(os.environ.get("MOGE_MOE_GEMV_MAX_TOKENS", "16"))


def cutover_tokens() -> set[int]:
    """Token counts where a kernel path changes with the count (GEMV up to them, grouped above): the
    step graphs capture a bucket at each, so no padded step crosses one its eager twin does not."""
    return {MOE_GEMV_MAX_TOKENS, int(setting("gemv_max_tokens"))}


def w8a8(tokens: int, key: str = "w8a8_over_tokens") -> bool:
    """Quantize the activations of a step of `tokens` rows? The cut-over is taken up to a multiple of
    64 (at most 1,024): every such count is a step-graph bucket (actors/engine/graphs/step_graphs.py
    `token_buckets`: multiples of 8 up to max_seqs, of 64 past it up to 1,024), so the padded count a
    graph was captured at falls on the same side as the real count an eager step sees. A cut-over
    between buckets would run W8A8 in the graph and weight-only eagerly: other greedy tokens."""
    limit = min(1024, max(64, -(-int(setting(key)) // 64) * 64))
    return tokens > limit


def tile(op: str, mode: str, n: int, k: int, tokens: int, rows_per_block: int, m_tiles: int = 1) -> Tile:
    entry = _tuned().get("tiles", {}).get(tile_key(op, mode, n, k, tokens))
    if entry is not None:
        t = Tile(*entry)
        if valid_tile(op, mode, t):
            return t
    return default_tile(op, mode, rows_per_block, n, m_tiles)
