"""Paged KV cache: fixed-size blocks of keys and values, one pool per layer.

Shape legend: NB = blocks, BS = block size (tokens per block), Hkv = KV heads, Dh = head dim,
T = new tokens of a step. A token's slot is block * BS + offset.
"""

from __future__ import annotations

import torch

from actors.model.config import ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pad_block: bool = False,
    ) -> None:
        """pad_block: one block more than num_blocks, never lent to a sequence, where the padding
        rows of a CUDA-graph batch write their K/V (block id `num_blocks`)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        # bound on any sequence's context (the engine sets max_model_len): sizes attention's KV splits
        self.max_seq_len = num_blocks * block_size
        self.pad_block = num_blocks if pad_block else None
        shape = (num_blocks + int(pad_block), block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # [NB, BS, Hkv, Dh]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_model(
        cls,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pad_block: bool = False,
    ) -> "PagedKVCache":
        return cls(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype, device, pad_block)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write the new tokens' k, v [T, Hkv, Dh] at their slots [T]."""
        self.k[layer].view(-1, *k.shape[1:])[slot_mapping] = k.to(self.k[layer].dtype)
        self.v[layer].view(-1, *v.shape[1:])[slot_mapping] = v.to(self.v[layer].dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
