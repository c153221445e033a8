"""Tensors <-> raw bytes with dtype and shape, for carriers that move bytes (gRPC).

The bytes are the tensor's own memory (row-major, native little-endian), so bfloat16 and other
dtypes numpy lacks travel unchanged. Decoding copies once into a fresh, writable tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Names on the wire are torch's dtype names; only these are accepted when decoding.
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32", "float16", "bfloat16", "float64",
        "int64", "int32", "int16", "int8", "uint8", "bool",
    )
}


@dataclass(frozen=True)
class EncodedTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"tensor_codec: dtype {dtype} is not supported on the wire")
    return name


def encode(t: torch.Tensor) -> EncodedTensor:
    name, shape, buffer = to_host_buffer(t)
    return EncodedTensor(name, shape, buffer.tobytes())


def decode(dtype: str, shape: tuple[int, ...] | list[int], data, device: torch.device | str = "cpu") -> torch.Tensor:
    """`data`: bytes, or any 1-D byte buffer (a read-only object-store numpy array included);
    always copied once into a fresh, writable tensor."""
    if dtype not in _DTYPES:
        raise ValueError(f"tensor_codec: unknown dtype {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    shape = tuple(int(s) for s in shape)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise ValueError(f"tensor_codec: {len(data)} bytes for {dtype}{list(shape)}, expected {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype, device=device)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # bytearray: writable, owned copy
    return raw.view(torch_dtype).reshape(shape).to(device)


def to_host_buffer(t: torch.Tensor) -> tuple[str, tuple[int, ...], "numpy.ndarray"]:
    """(dtype, shape, uint8 numpy array) of `t`'s bytes: Ray's object store moves numpy buffers
    without pickling them (zero-copy reads on the same node), any dtype included."""
    name = dtype_name(t.dtype)
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return name, tuple(int(s) for s in t.shape), flat.view(torch.uint8).numpy()

