"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A pure-decode step (one new token per sequence) launches the same kernels with the same shapes every
time for a given number of sequences, and nothing in it waits on the host (actors/model/: fused
kernels, paged decode attention on the device, routing and expert offsets on the device). So it is
captured once per bucket at start-up and replayed: one launch from the host instead of a few hundred.

Shape legend: B = sequences in the step, Bp = its bucket (smallest captured size >= B), Bmax = the
largest bucket, M = blocks of max_model_len, V = vocab.

Static buffers the graphs read and write (fixed addresses):
    meta    [4, Bmax] int64   rows: token ids, positions, KV slots, context lengths
    tables  [Bmax, M] int64   block tables
    logits  [Bmax, V] float32
Rows B..Bp-1 are padding: token 0 at position 0 writing its K/V into the cache's pad block (never
lent to a sequence) and attending to one key; their logits are dropped.

Per step on the host: one flat list of ints -> pinned buffer -> one host-to-device copy -> two device
copies into meta / tables -> replay. Sampling runs after the replay, outside the graph.
"""

from __future__ import annotations

import logging
import time

import torch

from actors.model.kv_cache import PagedKVCache
from actors.model.step_batch import StepBatch

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... (steps of 8) up to max_batch, max_batch itself included."""
    sizes = {b for b in (1, 2, 4) if b <= max_batch} | set(range(8, max_batch + 1, 8)) | {max_batch}
    return sorted(sizes)


class DecodeGraphs:
    def __init__(self, model, kv: PagedKVCache, max_batch: int, max_blocks_per_seq: int, cuda_graph_memory_mb: int,
                 forward=None, micro_batches=None) -> None:
        """`forward(batch, kv)`: what a graph captures (default the model; the ping-pong runner's
        forward for remote experts with ping-pong); `micro_batches(bp)`: the token counts it
        dispatches in, per step (default [bp])."""
        if kv.pad_block is None:
            raise ValueError("CUDA-graph decode needs a KV cache with a pad block")
        self.model, self.kv = model, kv
        self.forward = forward or model
        self.micro_batches = micro_batches or (lambda bp: [bp])
        # the ExpertCompute is told before a capture and around each replay (the step lane: header,
        # lane checks, deadline; no-ops for local experts)
        self.hooks = model.experts
        self.device = kv.k[0].device
        self.block_size = kv.block_size
        self.pad_slot = kv.pad_block * kv.block_size
        self.max_batch = max_batch
        self.budget_bytes = cuda_graph_memory_mb << 20
        long = dict(dtype=torch.long, device=self.device)
        self.meta = torch.zeros(4, max_batch, **long)
        self.tables = torch.full((max_batch, max_blocks_per_seq), kv.pad_block, **long)
        self.arange = torch.arange(max_batch + 1, **long)
        self.logits = torch.zeros(max_batch, model.cfg.vocab_size, dtype=torch.float32, device=self.device)
        staging = 4 * max_batch + max_batch * max_blocks_per_seq
        cuda = self.device.type == "cuda"
        self.staging_host = torch.empty(staging, dtype=torch.long, pin_memory=cuda)
        self.staging_dev = torch.empty(staging, **long)
        # the staging copy finished: the pinned buffer may be refilled
        self.copied = torch.cuda.Event() if cuda else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.bucket_of: list[int] = []  # batch size -> bucket, for 0..largest captured
        self.memory_bytes = 0

    def use_buckets(self, sizes: list[int]) -> None:
        """Serve batches up to max(sizes), each padded to the smallest size that holds it. Without a
        captured graph a bucket runs the model eagerly over the static buffers (tests on CPU)."""
        sizes = sorted(sizes)
        self.bucket_of = [0] + [next(s for s in sizes if s >= b) for b in range(1, sizes[-1] + 1)]

    # ---- start-up ------------------------------------------------------------------------------

    def batch(self, bp: int) -> StepBatch:
        """The StepBatch a bucket's graph is captured over: views of the static buffers."""
        return StepBatch(
            input_ids=self.meta[0, :bp],
            positions=self.meta[1, :bp],
            query_start=self.arange[: bp + 1],
            context_lens=self.meta[3, :bp],
            block_tables=self.tables[:bp],
            slot_mapping=self.meta[2, :bp],
            logits_index=self.arange[:bp],
        )

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every bucket, smallest first, while the memory they take stays in the budget
        (larger batches then run eagerly). All graphs share one memory pool."""
        started = time.perf_counter()
        reserved0 = self._reserved()
        self.meta[0].zero_()
        self.meta[1].zero_()
        self.meta[2].fill_(self.pad_slot)
        self.meta[3].fill_(1)
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for bp in bucket_sizes(self.max_batch):
            batch = self.batch(bp)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
                # (remote experts: an eager step over the lanes, which opens them and allocates
                # the bucket's packet and reply buffers the capture then reuses)
                self.forward(batch, self.kv)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if not self.hooks.graph_prepare(bp, self.micro_batches(bp)):
                log.warning("CUDA graphs: the expert lanes cannot be captured now; batch %d and up run eagerly", bp)
                break
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[:bp].copy_(self.forward(batch, self.kv))
            except Exception:
                if not self.hooks.graph_carrier:
                    raise
                # nothing captured ran, so the workers saw nothing of it: stay eager from here
                self.hooks.graph_captured(bp, ok=False)
                log.exception("CUDA graphs: capture over the expert lanes failed at batch %d; eager from here", bp)
                break
            self.hooks.graph_captured(bp)
            used = self._reserved() - reserved0
            if used > self.budget_bytes and self.graphs:
                del graph  # over budget: batches from here on run eagerly
                log.warning("CUDA graphs: batch %d would take %.0f MiB > budget %.0f MiB; larger batches run eagerly",
                            bp, used / 2**20, self.budget_bytes / 2**20)
                break
            self.graphs[bp] = graph
            self.memory_bytes = used
        sizes = sorted(self.graphs)
        self.use_buckets(sizes)
        log.info(
            "CUDA graphs: %d decode batch sizes (%s) captured in %.1f s, %.0f MiB of device memory (budget %.0f MiB)",
            len(sizes), ",".join(map(str, sizes)), time.perf_counter() - started,
            self.memory_bytes / 2**20, self.budget_bytes / 2**20,
        )

    def _reserved(self) -> int:
        """Device memory held by the allocator once its unused cache is released: what the graphs'
        private pool adds shows as growth (torch.cuda.graph empties the cache at each capture anyway)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(self.device)

    # ---- per step ------------------------------------------------------------------------------

    def covers(self, num_new_tokens: list[int]) -> bool:
        return 0 < len(num_new_tokens) < len(self.bucket_of) and all(n == 1 for n in num_new_tokens)

    def run(self, seqs) -> torch.Tensor:
        """One decode step of `seqs` (each with exactly one token to compute): [B, V] logits, a view
        of the static buffer that the next replay overwrites."""
        b = len(seqs)
        bp = self.bucket_of[b]
        pad = bp - b
        bs = self.block_size
        pos = [s.num_computed_tokens for s in seqs]
        width = max(len(s.block_table) for s in seqs)
        flat = [s.token_ids[p] for s, p in zip(seqs, pos)] + [0] * pad  # token ids
        flat += pos + [0] * pad  # positions
        flat += [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)] + [self.pad_slot] * pad
        flat += [p + 1 for p in pos] + [1] * pad  # context lengths
        for s in seqs:
            flat += s.block_table
            flat += [0] * (width - len(s.block_table))
        n = len(flat)
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy out of the pinned buffer is done
        host = self.staging_host[:n]
        host.copy_(torch.tensor(flat, dtype=torch.long))
        dev = self.staging_dev[:n]
        dev.copy_(host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.meta[:, :bp].copy_(dev[: 4 * bp].view(4, bp))
        self.tables[:b, :width].copy_(dev[4 * bp :].view(b, width))
        graph = self.graphs.get(bp)
        if graph is not None and self.hooks.graph_begin(bp):
            graph.replay()
            self.hooks.graph_end()  # may raise StepRerun (the model runner re-runs eagerly)
        else:
            self.logits[:bp].copy_(self.forward(self.batch(bp), self.kv))
        return self.logits[:b]
