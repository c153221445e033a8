"""Counter-based random numbers for sampling: u = hash(seed, step, token id), no generator state.

A request's noise at its n-th generated token depends only on (seed, n, vocabulary id), so a seeded
request draws the same tokens whichever requests share its batch, after a preemption, and inside a
captured CUDA graph (no host-side generator to advance, no host sync). Unseeded requests get a random
seed at admission and take the same path.

The hash is murmur3's 32-bit finaliser applied in rounds; multiplications are split into 16-bit
halves so every intermediate fits a signed int64 exactly (no reliance on overflow wrapping).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for 0 <= h < 2^32 without int64 overflow."""
    lo = (h & 0xFFFF) * c
    hi = ((h >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_keys(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[B] int64 seeds and token indices -> [B] 32-bit keys."""
    lo = seed & _M32
    hi = (seed >> 32) & _M32
    k = _fmix32(hi ^ _mul32(step & _M32, 0x9E3779B1))
    return _fmix32(lo ^ _fmix32(k + 0x632BE5AB & _M32))


def uniform(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B] seeds, [B] steps -> [B, V] float32 uniforms in (0, 1), 24 bits each."""
    key = row_keys(seed, step)[:, None]  # [B, 1]
    ids = _mul32(torch.arange(vocab, device=seed.device), 0x27D4EB2F)[None, :]  # [1, V]
    h = _fmix32(_fmix32(key ^ ids) ^ key)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] standard Gumbel noise: argmax(logits + g) draws from softmax(logits)."""
    return -torch.log(-torch.log(uniform(seed, step, vocab)))
