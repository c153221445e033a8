"""The group copy lane over NCCL between two processes on two GPUs, each seeing only its own
device (as Ray's workers do): the target receives the exact bytes into its own buffers, and a
holder that refuses or a lane that does not answer fails fast. Skips below 2 GPUs.

    python -m pytest tests/gpu/test_group_copy_gpu.py -q
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(N_GPUS < 2, reason="needs 2 CUDA GPUs")]

GROUPS = [1, 3]


def _identity(cfg, groups, device):
    from actors.experts.group_copy import allocate_groups

    out = allocate_groups(cfg, groups, torch.bfloat16, device)
    for g, w in out.items():
        for k, tensors in enumerate((w.w13, w.w2)):
            for layer, t in tensors.items():
                # exact in bf16: small integers that name the group, tensor, layer and position
                t.copy_((torch.arange(t.numel(), device=device) % 97 + 100 * g + 10 * k + layer).view_as(t))
    return out


def _holder(ready, done):
    from actors.experts.group_copy import GroupCopyServer
    from actors.model.presets import get_preset

    cfg = get_preset("tiny-moge")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    src = _identity(cfg, range(cfg.n_groups), dev)
    server = GroupCopyServer(lambda: src, dev)
    ready.put(server.address())
    done.get(timeout=120)
    server.stop()


def _target(endpoint, result):
    from actors.experts.group_copy import CopyFailed, copy_groups
    from actors.model.presets import get_preset

    cfg = get_preset("tiny-moge")
    dev = torch.device("cuda", 0)
    try:
        got, info = copy_groups(endpoint, cfg, GROUPS, torch.bfloat16, dev, timeout_s=60)
        want = _identity(cfg, GROUPS, dev)
        same = all(torch.equal(getattr(got[g], n)[layer], getattr(want[g], n)[layer])
                   for g in GROUPS for n in ("w13", "w2") for layer in want[g].w13)
        on_device = all(t.is_cuda for g in GROUPS for t in got[g].w13.values())
        try:
            copy_groups(endpoint, cfg, [0], torch.float32, dev, timeout_s=20)  # wrong dtype: refused
            refused = False
        except CopyFailed:
            refused = True
        result.put({"same": same, "on_device": on_device, "refused": refused, "backend": endpoint["backend"],
                    "bytes": info["bytes"]})
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result.put({"error": f"{type(exc).__name__}: {exc}"})


def _spawn(ctx, target, args, gpu):
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    try:
        p = ctx.Process(target=target, args=args, daemon=True)
        p.start()
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    return p


def test_nccl_peer_copy_between_two_gpus_moves_exact_bytes():
    ctx = mp.get_context("spawn")
    ready, done, result = ctx.Queue(), ctx.Queue(), ctx.Queue()
    holder = _spawn(ctx, _holder, (ready, done), 0)
    try:
        endpoint = ready.get(timeout=120)
        target = _spawn(ctx, _target, (endpoint, result), 1)
        out = result.get(timeout=180)
        target.join(30)
    finally:
        done.put(True)
        holder.join(30)
        if holder.is_alive():
            holder.kill()
    assert "error" not in out, out
    assert out["backend"] == "nccl" and out["same"] and out["on_device"] and out["refused"], out
