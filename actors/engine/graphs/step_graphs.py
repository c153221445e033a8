"""Whole steps replayed from CUDA graphs, one graph per token-count bucket: decode steps and mixed
steps (decodes next to prefill chunks) alike.

Every kernel of a step takes its sizes from the shapes alone and reads its metadata on the device
(fused kernels; varlen paged attention over the block table, actors/model/kernels/paged_attention.py;
routing and expert offsets on the device), so a step of T tokens padded to the bucket Tp >= T
launches the same kernels with the same shapes whatever its mix of sequences: captured once per
bucket at start-up, replayed with one launch from the host instead of a few thousand. This is
vLLM V1's "full" graph mode; its "piecewise" mode (graphs between eager attention launches) was
measured against it (docs/performance.md, section 6) and needs no graph of its own here, since
the attention launch has no host-side metadata to prepare.

Shape legend: T = tokens in the step, B = sequences, Tp = bucket, Bmax = max_num_seqs, NS = the
bucket's sequence rows, R = its logits rows, M = blocks of max_model_len, V = vocab.

Buckets (`token_buckets`): the decode sizes 1, 2, 4, 8, 16, 24, ... (steps of 8) up to Bmax, then
coarser steps up to max_num_batched_tokens. A bucket has NS = min(Tp, Bmax) + (Tp > Bmax) sequence
rows and R = min(Tp, Bmax) logits rows. Rows past the step's own are padding that computes
nothing anyone reads: in a bucket up to Bmax each padding token is a one-token sequence at position
0 (the decode layout: the ping-pong split and the step lane take it as it always was); past Bmax all
padding tokens form one sequence of context 1, whose tokens see no key but the last (attention gives
zeros there). Padding tokens write their K/V into the cache's pad block, never lent to a sequence.

Static buffers the graphs read and write (fixed addresses; each bucket views its own layout):
    fixed   [4 Tp + 2 NS + 1 + R] int64   token ids | positions | KV slots | src | query_start |
                                           context lengths | logits rows
    tables  [Bmax + 1, M] int64           block tables
    logits  [Bmax, V] float32
    sampled [Bmax] int64                  the previous step's sampled tokens (the runner writes it;
                                           a token row with src >= 0 reads its id from there)

Per step on the host: one flat list of ints -> pinned memory -> one host-to-device copy -> two
device copies -> replay. Sampling runs after the replay, outside the graph.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from actors.device import h2d
from actors.engine.steps.step_inputs import StepInputs, resolve_ids
from actors.model.kv_cache import PagedKVCache
from actors.model.step_batch import StepBatch

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... (steps of 8) up to max_batch, max_batch itself included."""
    sizes = {b for b in (1, 2, 4) if b <= max_batch} | set(range(8, max_batch + 1, 8)) | {max_batch}
    return sorted(sizes)


def token_buckets(max_seqs: int, max_tokens: int) -> list[int]:
    """The decode sizes up to max_seqs, then multiples of 64 up to 1,024, of 256 up to 4,096 and of
    1,024 beyond, up to max_tokens (itself included): padding stays under a quarter of a step. The
    kernels' token-count cut-overs are buckets too (configs.cutover_tokens; the FP8 activation
    scheme's lies on a multiple of 64 already), so a step replayed from a graph runs the kernel
    path it runs eagerly."""
    from actors.model.kernels.gemm.configs import cutover_tokens

    sizes = set(bucket_sizes(min(max_seqs, max_tokens))) | {t for t in cutover_tokens() if 0 < t < max_tokens}
    for step, top in ((64, 1024), (256, 4096), (1024, max_tokens)):
        sizes |= {s for s in range(step, min(top, max_tokens) + 1, step) if s > max_seqs}
    sizes.add(max_tokens)
    return sorted(sizes)


class StepGraphs:
    def __init__(self, model, kv: PagedKVCache, max_seqs: int, max_tokens: int, max_blocks_per_seq: int,
                 cuda_graph_memory_mb: int, sampled: torch.Tensor, forward=None, micro_batches=None,
                 mixed: bool = True) -> None:
        """`forward(batch, kv)`: what a graph captures (default the model; the ping-pong runner's
        forward for remote experts with ping-pong); `micro_batches(tp)`: the token counts it
        dispatches in, per step (default [tp]); `mixed`: capture buckets past max_seqs too and
        replay steps with prefill chunks (False: pure decode steps only, the step lane's case);
        `sampled`: the runner's [Bmax] buffer of the last sampled tokens."""
        if kv.pad_block is None:
            raise ValueError("CUDA graphs need a KV cache with a pad block")
        self.model, self.kv = model, kv
        self.forward = forward or model
        self.micro_batches = micro_batches or (lambda tp: [tp])
        # the ExpertCompute is told before a capture and around each replay (the step lane, whose
        # NCCL ops sit inside the captured step: header, lane checks, deadline; no-ops otherwise)
        self.hooks = model.experts
        self.carrier = self.hooks.graph_carrier
        self.device = kv.k[0].device
        self.block_size = kv.block_size
        self.pad_slot = kv.pad_block * kv.block_size
        self.max_seqs = max_seqs
        self.mixed = mixed
        self.sizes = token_buckets(max_seqs, max_tokens) if mixed else bucket_sizes(max_seqs)
        self.max_tokens = self.sizes[-1]
        self.budget_bytes = cuda_graph_memory_mb << 20
        long = dict(dtype=torch.long, device=self.device)
        self.fixed = torch.zeros(self._fixed_len(self.max_tokens), **long)
        self.tables = torch.full((max_seqs + 1, max_blocks_per_seq), kv.pad_block, **long)
        self.logits = torch.zeros(max_seqs, model.cfg.vocab_size, dtype=torch.float32, device=self.device)
        self.sampled = sampled
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.bucket_of: list[int] = []  # token count -> bucket, for 0..largest captured
        self.memory_bytes = 0
        self.last_bucket = 0  # bucket of the last run (tests, profiling)

    def use_buckets(self, sizes: list[int]) -> None:
        """Serve steps up to max(sizes) tokens, each padded to the smallest size that holds it.
        Without a captured graph a bucket runs the model eagerly over the static buffers (tests on CPU)."""
        sizes = sorted(sizes)
        self.bucket_of = [0] + [next(s for s in sizes if s >= t) for t in range(1, sizes[-1] + 1)]

    # ---- layout ---------------------------------------------------------------------------------

    def _rows(self, tp: int) -> tuple[int, int]:
        """(NS, R): sequence rows and logits rows of bucket tp."""
        r = min(tp, self.max_seqs)
        return r + (tp > self.max_seqs), r

    def _fixed_len(self, tp: int) -> int:
        ns, r = self._rows(tp)
        return 4 * tp + 2 * ns + 1 + r

    def batch(self, tp: int, max_query: int | None = None) -> tuple[StepBatch, torch.Tensor]:
        """(the StepBatch bucket tp's graph is captured over, its src row): views of the static buffers."""
        ns, r = self._rows(tp)
        ids, positions, slots, src, query_start, context_lens, rows = self.fixed[: self._fixed_len(tp)].split(
            [tp, tp, tp, tp, ns + 1, ns, r])
        return StepBatch(ids, positions, query_start, context_lens, self.tables[:ns], slots, rows,
                         max_query=max_query), src

    def _step(self, batch: StepBatch, src: torch.Tensor) -> torch.Tensor:
        """The captured work: in-flight token ids from the sampled buffer, then the model."""
        ids = resolve_ids(batch.input_ids, src, self.sampled)
        return self.forward(StepBatch(ids, *(getattr(batch, f) for f in (
            "positions", "query_start", "context_lens", "block_tables", "slot_mapping", "logits_index")),
            max_query=batch.max_query), self.kv)

    def _fill(self, inputs: StepInputs | None, tp: int) -> tuple[list[int], int]:
        """The bucket's fixed part for `inputs` (None: all padding), and the max query of the layout."""
        ns, r = self._rows(tp)
        if inputs is None:
            t, b, ids, pos, slots, src, qs, ctx, rows = 0, 0, [], [], [], [], [0], [], []
            max_query = 0
        else:
            t, b = inputs.num_tokens, inputs.num_seqs
            ids, pos, slots = inputs.ids, inputs.positions, inputs.slots
            src = inputs.src if inputs.src is not None else [-1] * t
            qs, ctx, rows, max_query = inputs.query_start, inputs.context_lens, inputs.logits_rows, inputs.max_query
        pad = tp - t
        flat = ids + [0] * pad
        flat += pos + [0] * pad
        flat += slots + [self.pad_slot] * pad
        flat += src + [-1] * pad
        if tp <= self.max_seqs:  # each padding token a one-token sequence at position 0
            flat += qs + list(range(t + 1, tp + 1)) + [tp] * (ns - b - pad)
            flat += ctx + [1] * (ns - b)
            flat += rows + list(range(t, t + min(pad, r - b))) + [0] * max(0, r - b - pad)
            max_query = max(max_query, 1)
        else:  # all padding tokens one sequence of context 1
            flat += qs + [tp] * (ns - b)
            flat += ctx + [1] * (ns - b)
            flat += rows + [0] * (r - b)
            max_query = max(max_query, pad)
        return flat, max_query

    # ---- start-up ------------------------------------------------------------------------------

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller ones then reuse the pool's blocks), into
        one memory pool; a bucket that takes the pool over the budget is dropped (it runs eagerly);
        with none captured every step runs eagerly."""
        started = time.perf_counter()
        reserved0 = self._reserved()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        captured = []
        # the step lane keeps its order of old (smallest first, stop at the first size it cannot take)
        for tp in sorted(self.sizes, reverse=not self.carrier):
            flat, _ = self._fill(None, tp)
            self.fixed[: len(flat)].copy_(torch.tensor(flat, dtype=torch.long))
            batch, src = self.batch(tp)
            _, r = self._rows(tp)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
                # (remote experts: an eager step over the lanes, which opens them and allocates
                # the bucket's packet and reply buffers the capture then reuses)
                self._step(batch, src)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if not self.hooks.graph_prepare(tp, self.micro_batches(tp)):
                log.warning("CUDA graphs: the expert lanes cannot be captured now; step size %d and up run eagerly", tp)
                break
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[:r].copy_(self._step(batch, src))
            except Exception:
                if not self.carrier:
                    raise
                # nothing captured ran, so the workers saw nothing of it: stay eager for this size
                self.hooks.graph_captured(tp, ok=False)
                log.exception("CUDA graphs: capture over the expert lanes failed at step size %d; eager from here", tp)
                break
            self.hooks.graph_captured(tp)
            used = self._reserved() - reserved0
            if used > self.budget_bytes and captured:
                del graph
                log.warning("CUDA graphs: step size %d would take the graphs to %.0f MiB > budget %.0f MiB; "
                            "it runs eagerly", tp, used / 2**20, self.budget_bytes / 2**20)
                continue
            self.graphs[tp] = graph
            captured.append(tp)
            self.memory_bytes = used
        sizes = sorted(self.graphs)
        if sizes:
            self.use_buckets(sizes)
        log.info("CUDA graphs: %d step sizes (%s) captured in %.1f s, %.0f MiB of device memory (budget %.0f MiB)",
                 len(sizes), ",".join(map(str, sizes)), time.perf_counter() - started,
                 self.memory_bytes / 2**20, self.budget_bytes / 2**20)

    def _reserved(self) -> int:
        """Device memory held by the allocator once its unused cache is released: what the graphs'
        private pool adds shows as growth (torch.cuda.graph empties the cache at each capture anyway)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(self.device)

    # ---- per step ------------------------------------------------------------------------------

    def covers(self, num_new_tokens: list[int]) -> bool:
        t = sum(num_new_tokens)
        if not 0 < t < len(self.bucket_of):
            return False
        return self.mixed or t == len(num_new_tokens)  # decode-only graphs: one token per sequence

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """One step: [B, V] logits, a view of the static buffer that the next replay overwrites."""
        tp = self.bucket_of[inputs.num_tokens]
        self.last_bucket = tp
        b, width = inputs.num_seqs, inputs.width
        flat, max_query = self._fill(inputs, tp)
        n = len(flat)
        for table in inputs.tables:
            flat += table
            flat += [0] * (width - len(table))
        dev = h2d(torch.tensor(flat, dtype=torch.long), self.device)
        self.fixed[:n].copy_(dev[:n])
        self.tables[:b, :width].copy_(dev[n:].view(b, width))
        _, r = self._rows(tp)
        graph = self.graphs.get(tp)
        if graph is not None and self.hooks.graph_begin(tp):
            graph.replay()
            self.hooks.graph_end()  # may raise StepRerun (the model runner re-runs eagerly)
        else:
            self.logits[:r].copy_(self._step(*self.batch(tp, max_query)))
        return self.logits[:b]

    def time_replay(self, tp: int, n: int = 3) -> float:
        """Median ms of n replays of bucket tp over whatever the static buffers hold (the start-up
        step-cost profile, benchmarks)."""
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(n):
            start.record()
            self.graphs[tp].replay()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return statistics.median(times)
