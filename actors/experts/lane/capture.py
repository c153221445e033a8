"""CUDA-graph capture on one stream, without the device-wide synchronisation torch.cuda.graph does
(the expert worker captures its lanes' layer loops with this).
"""

from __future__ import annotations

import torch



def capture_on(stream, fn):
    """A CUDA graph of fn() captured on `stream` (thread-local capture mode).

    Not torch.cuda.graph(): its __enter__ synchronizes the whole device and empties the cache
    (cudaFree syncs the device too). A worker's idle lanes each keep an NCCL receive for their
    next header posted on the device, and that receive only completes when the replica sends the
    next step, which it does only after this step's replies, so a device-wide sync here would wait
    forever. The caller synchronizes `stream` before capturing (warm-up ran on it)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            fn()
        except BaseException:
            try:
                graph.capture_end()
            except Exception:  # noqa: BLE001 - the capture is invalid already; report fn's error
                pass
            raise
        graph.capture_end()
    return graph
