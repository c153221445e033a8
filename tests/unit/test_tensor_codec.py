import pytest
import torch

from actors.experts.carriers.codec import decode, encode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool])
def test_round_trip_keeps_values_dtype_and_shape(dtype):
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(3, 5, generator=g) * 100).to(dtype)
    enc = encode(t)
    assert enc.dtype == str(dtype).removeprefix("torch.")
    assert enc.shape == (3, 5)
    assert len(enc.data) == t.numel() * t.element_size()
    back = decode(enc.dtype, enc.shape, enc.data)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_bfloat16_bits_survive_exactly():
    t = torch.tensor([1.0 + 2**-7, -3.5, 1e-30], dtype=torch.bfloat16)
    back = decode(*vars(encode(t)).values())
    assert torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_non_contiguous_and_scalar_and_empty():
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(decode(*vars(encode(t)).values()), t)
    s = torch.tensor(7, dtype=torch.int64)
    assert decode(*vars(encode(s)).values()).item() == 7
    e = torch.empty(0, 16)
    back = decode(*vars(encode(e)).values())
    assert back.shape == (0, 16)


def test_decoded_tensor_is_writable_and_independent():
    enc = encode(torch.ones(4))
    back = decode(enc.dtype, enc.shape, enc.data)
    back += 1  # would fail or warn on a read-only buffer
    assert torch.equal(decode(enc.dtype, enc.shape, enc.data), torch.ones(4))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="bytes"):
        decode("float32", (2, 2), b"\x00" * 15)
    with pytest.raises(ValueError, match="unknown dtype"):
        decode("complex_thing", (1,), b"\x00")
    with pytest.raises(ValueError, match="not supported"):
        encode(torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_host_buffer_round_trip_is_exact_and_owned(dtype):
    from actors.experts.carriers.codec import to_host_buffer

    t = (torch.randn(4, 3, 2) * 50).to(dtype).transpose(0, 2)  # non-contiguous on purpose
    name, shape, buf = to_host_buffer(t)
    buf.flags.writeable = False  # what an object-store read hands back
    back = decode(name, shape, buf)
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    back += 1  # owned and writable, never a view of the read-only buffer
    assert torch.equal(decode(name, shape, buf), t)
