"""Block-scaled FP8 weights: the format of HF "fp8" checkpoints (Qwen3-*-FP8, DeepSeek-V3) and of
`model.quantization: fp8`.

A weight W [..., N, K] is stored as q (float8_e4m3fn, same shape) and one float32 scale per block of
128 rows x 128 columns (HF's `weight_scale_inv`): W[n, k] = q[n, k] * scale[n // 128, k // 128]. Edge
blocks may be partial (N or K not a multiple of 128): their scale covers the rows/columns there are.

Stacked projections (w13 = gate rows, then up rows) keep both parts' block grids: rows >= `split`
start a grid of their own, so a per-expert checkpoint whose I is not a multiple of 128 (Pangu Pro's
1344) is stored exactly as written, with no re-quantization. Row n's scale row is
    n // 128                              for n < split
    ceil(split / 128) + (n - split) // 128   for n >= split
which for split = 0 (one grid: a fused gate_up tensor quantized as a whole) is n // 128, and for a
split that is a multiple of 128 is again n // 128: the kernels always use this one formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_rows(n: int, split: int = 0) -> int:
    """Scale rows of a weight with n rows whose second grid starts at row `split` (0 = one grid)."""
    return cdiv(split, BLOCK) + cdiv(n - split, BLOCK) if split else cdiv(n, BLOCK)


def _row_index(n: int, split: int, device) -> torch.Tensor:
    rows = torch.arange(n, device=device)
    if not split:
        return rows // BLOCK
    return torch.where(rows < split, rows // BLOCK, cdiv(split, BLOCK) + (rows - split) // BLOCK)


@dataclass
class BlockFp8:
    """One block-scaled FP8 weight (or a stack of them on leading axes, e.g. [E, N, K] experts)."""

    q: torch.Tensor  # [..., N, K] float8_e4m3fn
    scale: torch.Tensor  # [..., scale_rows(N, split), ceil(K / 128)] float32
    split: int = 0  # first row of a second block grid (stacked gate/up), 0 = one grid

    def __post_init__(self) -> None:
        if self.q.dtype != FP8:
            raise TypeError(f"BlockFp8 holds {FP8}, not {self.q.dtype}")
        n, k = self.q.shape[-2:]
        want = (*self.q.shape[:-2], scale_rows(n, self.split), cdiv(k, BLOCK))
        if tuple(self.scale.shape) != want:
            raise ValueError(f"FP8 scales of a {list(self.q.shape)} weight (split {self.split}) must be "
                             f"{list(want)}, got {list(self.scale.shape)}")

    # ---- tensor-like surface the expert and model code uses ----------------------------------

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def is_cuda(self) -> bool:
        return self.q.is_cuda

    @property
    def dtype(self) -> torch.dtype:
        return FP8

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def __getitem__(self, index) -> "BlockFp8":
        """Leading-axis indexing only (an expert, a slice of experts): the block grid stays whole."""
        if self.q.dim() < 3:
            raise IndexError("only stacked FP8 weights ([E, N, K]) can be indexed")
        if not isinstance(index, (int, slice)):
            raise IndexError(f"FP8 weights are indexed by an int or a slice of the expert axis, not {index!r}")
        return BlockFp8(self.q[index], self.scale[index], self.split)

    def map(self, fn) -> "BlockFp8":
        """The same weight with fn applied to both tensors (a move, a compacting copy)."""
        return BlockFp8(fn(self.q), fn(self.scale), self.split)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "BlockFp8":
        """Moves; `dtype` is the compute dtype of the caller's other weights, which FP8 weights do
        not take (they stay FP8: dequantize() gives the compute-dtype tensor)."""
        return self.map(lambda t: t.to(device=device))

    def contiguous(self) -> "BlockFp8":
        return self.map(torch.Tensor.contiguous)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W in `dtype`: q * its block's scale, computed in float32, rounded once."""
        return dequantize(self.q, self.scale, dtype, self.split)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, split: int = 0) -> torch.Tensor:
    """q [..., N, K] (float8) with block scales -> [..., N, K] in dtype."""
    n, k = q.shape[-2:]
    rows = _row_index(n, split, q.device)
    cols = torch.arange(k, device=q.device) // BLOCK
    full = scale.float().index_select(-2, rows).index_select(-1, cols)  # [..., N, K]
    return (q.float() * full).to(dtype)


def quantize(w: torch.Tensor, split: int = 0) -> BlockFp8:
    """w [..., N, K] (any float dtype) -> BlockFp8 with scale = amax(|block|) / 448 per block (1 for an
    all-zero block), q = w / scale rounded to e4m3 (round to nearest even, saturating at ±448).
    Computed in float32 on w's device; the float32 copy is the only temporary."""
    if split:
        lo, hi = quantize(w[..., :split, :]), quantize(w[..., split:, :])
        return BlockFp8(torch.cat([lo.q, hi.q], dim=-2), torch.cat([lo.scale, hi.scale], dim=-2), split)
    *lead, n, k = w.shape
    nb, kb = cdiv(n, BLOCK), cdiv(k, BLOCK)
    wf = w.float()
    if n % BLOCK or k % BLOCK:  # partial edge blocks: pad with zeros, which never raise an amax
        wf = torch.nn.functional.pad(wf, (0, kb * BLOCK - k, 0, nb * BLOCK - n))
    blocks = wf.view(*lead, nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale.unsqueeze(-1).unsqueeze(-3)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    del wf, blocks
    q = q.view(*lead, nb * BLOCK, kb * BLOCK)[..., :n, :k].contiguous()
    return BlockFp8(q, scale.contiguous(), 0)


def cat(weights: list[BlockFp8]) -> BlockFp8:
    """Stack on the leading (expert) axis."""
    splits = {w.split for w in weights}
    if len(splits) != 1:
        raise ValueError(f"cannot stack FP8 weights with different row splits {sorted(splits)}")
    return BlockFp8(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]), splits.pop())


def nbytes(w) -> int:
    """Bytes of a weight, dense tensor or BlockFp8."""
    return w.nbytes if isinstance(w, BlockFp8) else w.numel() * w.element_size()


def as_dense(w, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a dense tensor of `dtype`: BlockFp8 dequantized, a tensor as it is."""
    return w.dequantize(dtype) if isinstance(w, BlockFp8) else w
