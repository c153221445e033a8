"""The serving engine of one attention replica: requests in, token/text deltas out, one step at a
time. Single-threaded; actors/engine/async_engine.py drives it from a background thread.

A step: the scheduler picks sequences and token counts, the model runner (actors/engine/model_runner.py)
turns them into last-token logits, the sequences whose whole context is now computed sample a token,
and stop conditions and text deltas are worked out.

Shape legend: T = tokens in the step, B = sequences in the step, M = widest block table, V = vocab.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from actors.device import h2d
from actors.engine.block_manager import BlockManager
from actors.engine.request_rejected import RequestRejected
from actors.engine.sampler import Sampler
from actors.engine.sampling.grammar import GrammarCompiler, GrammarLimits
from actors.engine.sampling.logprobs import TokenLogprob, prompt_logprobs
from actors.engine.sampling.slots import SlotTable
from actors.engine.sampling_params import SamplingParams
from actors.engine.model_runner import ModelRunner
from actors.engine.output.request_output import RequestOutput
from actors.engine.output.text_stream import TextStream
from actors.engine.scheduler import Scheduler
from actors.engine.sequence import PENDING, Sequence
from actors.engine.steps.launched import LaunchedStep
from actors.model import kernels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    max_model_len: int  # context length: prompt + completion
    num_kv_blocks: int
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    ping_pong: bool = False  # two micro-batches per step (remote experts)
    enable_prefix_caching: bool = True  # share full KV blocks of identical prefixes between requests
    cuda_graphs: bool = True  # decode steps replayed from CUDA graphs (CUDA, in-process experts)
    cuda_graph_memory_mb: int = 4096  # device memory the captured graphs may take
    # every row's logits independent of the rest of its batch (kernels/invariant.py); the mode is
    # the process's, so the engine sets it before its graphs are captured
    batch_invariant: bool = False
    grammar: GrammarLimits = GrammarLimits()  # size, compile time and threads of structured output
    async_scheduling: bool | None = None  # launch step N + 1 before step N's tokens reach the host (None: on CUDA)
    # a step with prompt chunks costs at most this times a full decode step (start-up profile of the
    # captured graphs sets the per-step token cap; 0 or no graphs: max_num_batched_tokens alone)
    step_cost_ratio: float = 1.5


@dataclass
class EngineStats:
    waiting: int
    running: int
    kv_usage: float  # fraction of KV blocks in use, 0..1
    kv_blocks_total: int
    kv_blocks_free: int
    preemptions: int
    tokens_generated: int
    steps: int
    prefix_cache_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0  # ... of which were found there


class LLMEngine:
    def __init__(self, loaded: Any, spec: EngineSpec) -> None:
        """`loaded` is a LoadedModel (actors/weights/loader.py): .model, .cfg, .tokenizer."""
        self.model = loaded.model
        self.cfg = loaded.cfg
        self.tokenizer = loaded.tokenizer
        self.name = getattr(loaded, "name", "model")
        self.spec = spec
        kernels.set_batch_invariant(spec.batch_invariant)
        if spec.batch_invariant:
            from actors.model.kernels.invariant import fuse_projections

            fuse_projections(self.model)  # before the decode graphs are captured
        self.runner = ModelRunner(
            self.model, self.cfg, spec.num_kv_blocks, spec.block_size, ping_pong=spec.ping_pong,
            cuda_graphs=spec.cuda_graphs, max_num_seqs=spec.max_num_seqs, max_model_len=spec.max_model_len,
            cuda_graph_memory_mb=spec.cuda_graph_memory_mb, max_num_batched_tokens=spec.max_num_batched_tokens,
        )
        self.kv = self.runner.kv
        self.blocks = BlockManager(spec.num_kv_blocks, spec.block_size, spec.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, spec.max_num_seqs, spec.max_num_batched_tokens)
        self.step_costs = None  # what a captured step costs by tokens (the scheduler's token cap)
        graphs = self.runner.graphs
        if graphs is not None and graphs.mixed and spec.step_cost_ratio > 0:
            from actors.engine.graphs.step_cost import profile_step_costs

            self.step_costs = profile_step_costs(graphs, spec.step_cost_ratio)
            if self.step_costs is not None:
                self.scheduler.step_token_cap = self.step_costs.cap
        self.slots = SlotTable(spec.max_num_seqs, self.cfg.vocab_size, self.runner.device)
        self.sampler = Sampler(self.slots)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.cfg.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.cfg.vocab_size, sorted(self.eos_token_ids), spec.grammar)
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._tokens_generated = 0
        self._steps = 0
        # async scheduling (None: on CUDA): the step launched last, completed by the next step()
        self.async_scheduling = (self.runner.device.type == "cuda" if spec.async_scheduling is None
                                 else spec.async_scheduling)
        self._inflight: LaunchedStep | None = None
        self._sync_requests: set[str] = set()  # requests whose steps cannot overlap (grammar, prompt scoring)
        # step() makes the text (stop strings end requests here) for offline use; the async engine
        # turns this off and makes it per stream, off the step thread
        self.make_text = True
        self.clock = time.monotonic  # timestamps in outputs (queue, prefill); same clock as the HTTP front

    # ---- requests ---------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Raise RequestRejected if the request can never run; return its completion-token cap.
        Reads only fixed configuration, so any thread may call it."""
        n = len(prompt_token_ids)
        limit = self.spec.max_model_len
        if n == 0:
            raise RequestRejected("the prompt is empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestRejected(f"prompt token id {bad[0]} is outside the vocabulary (size {self.cfg.vocab_size})")
        if n >= limit:
            raise RequestRejected(f"the prompt has {n} tokens but the context length is {limit}")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if params.grammar is not None:
            self.grammars.check(params.grammar)
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestRejected(f"stop token id {bad[0]} is outside the vocabulary (size {self.cfg.vocab_size})")
        if n + max_tokens > limit:
            raise RequestRejected(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds the "
                f"context length of {limit} tokens; lower max_tokens or shorten the prompt"
            )
        _check_sampling(params)
        need = self.blocks.blocks_for(n + max_tokens)
        if need > self.blocks.num_blocks:
            raise RequestRejected(
                f"the request needs up to {n + max_tokens} tokens of KV cache but this replica holds "
                f"{self.blocks.num_blocks * self.blocks.block_size}; lower max_tokens"
            )
        return max_tokens

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    generated: list[int] | None = None) -> None:
        """`generated`: a continuation — tokens this request already produced elsewhere (a replica
        that died mid-stream). They are prefilled with the prompt (none of them PENDING: async
        scheduling starts from known tokens), the grammar matcher and the text stream (here with
        make_text, else the async engine's) are replayed over them, so stop strings and held-back
        text are as they were, and the sampling slot's step counter starts at their count, so a
        seeded or greedy request goes on with exactly the tokens it would have had (counter-based
        noise: sampling/noise.py)."""
        params = params or SamplingParams()
        if request_id in self._seqs:
            raise RequestRejected(f"request id {request_id!r} is already running")
        max_tokens = self.check_request(prompt_token_ids, params)
        prompt = [int(t) for t in prompt_token_ids]
        done = [int(t) for t in generated or ()]
        if len(done) >= max(max_tokens, 1) or any(not 0 <= t < self.cfg.vocab_size for t in done):
            raise RequestRejected(f"a continuation of {len(done)} tokens does not fit max_tokens {max_tokens}")
        matcher = None if params.grammar is None else self.grammars.matcher(params.grammar)
        for t in done if matcher is not None else ():  # the state the first replica had after these tokens
            matcher.consume_token(t)
        seq = Sequence(
            request_id=request_id,
            token_ids=prompt + done,
            num_prompt_tokens=len(prompt),
            params=params,
            max_total_tokens=len(prompt) + max_tokens,
            arrival=next(self._arrivals),
            text_stream=TextStream(self.tokenizer, prompt, params, done) if self.make_text else None,
            matcher=matcher,
            prompt_logprobs=None if params.prompt_logprobs is None or done else [None],
        )
        if seq.matcher is not None:
            seq.grammar_mask = self.grammars.prefetch(seq.matcher)
        self._seqs[request_id] = seq
        if seq.matcher is not None or seq.prompt_logprobs is not None:
            self._sync_requests.add(request_id)  # its next step needs this one's tokens on the host
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request wherever it is and free its KV blocks; None if it is not known."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        self._forget(seq)
        self.scheduler.finish(seq, "abort")
        self._release_slot(seq)
        return self._output(seq, [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def run_to_completion(self, max_steps: int = 10_000) -> dict[str, list[int]]:
        """Step until nothing is left (bounded): new token ids per request id, in order. For
        offline use, benchmarks and tests; the server streams through AsyncEngine instead."""
        out: dict[str, list[int]] = {rid: [] for rid in self._seqs}
        for _ in range(max_steps):
            if not self.has_unfinished():
                break
            for o in self.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out

    def unfinished_request_ids(self) -> list[str]:
        return list(self._seqs)

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            kv_usage=self.blocks.usage,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_free=self.blocks.num_free_blocks,
            preemptions=self.scheduler.num_preemptions,
            tokens_generated=self._tokens_generated,
            steps=self._steps,
            prefix_cache_queried_tokens=self.blocks.queried_tokens,
            prefix_cache_hit_tokens=self.blocks.hit_tokens,
        )

    # ---- one step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step: schedule, run the model, sample. With async scheduling (CUDA by default) the step
        launched here completes in the next call — its tokens reach the host while the device runs
        the step after it, whose decode rows read those tokens on the device — so the outputs
        returned are those of the previous step. A sequence that finished in step N was already
        scheduled in step N + 1: that one row is computed and dropped. Steps with grammar-
        constrained or prompt-scoring requests run synchronously (their next step needs the host to
        have seen the tokens)."""
        kernels.set_batch_invariant(self.spec.batch_invariant)  # the mode is the process's; engines may share one
        outputs: list[RequestOutput] = []
        overlap = self._can_overlap()
        if self._inflight is not None and not overlap:
            outputs += self._complete(self._inflight)
            self._inflight = None
        scheduled = self.scheduler.schedule()
        if scheduled:
            self._mark_scheduled(scheduled.seqs)
        elif self._inflight is None:  # every runnable sequence waits for its grammar mask
            self._wait_for_grammar_masks()
        launched = self._launch(scheduled) if scheduled else None
        if self._inflight is not None:  # step N's results, while the device runs step N + 1
            outputs += self._complete(self._inflight)
            self._inflight = None
        if launched is not None:
            if overlap and launched.per_row is None:
                self._inflight = launched
            else:
                outputs += self._complete(launched)
        return outputs

    def _can_overlap(self) -> bool:
        return self.async_scheduling and not self._sync_requests

    def _launch(self, scheduled) -> LaunchedStep:
        """Run the model and queue the sampling on the device; advance the host state as if the
        sampled tokens were known (they sit in token_ids as PENDING until `_complete`)."""
        scoring = self._prompt_rows(scheduled)  # [(seq, flat row, target token)] for prompt logprobs
        logits, extra = self.runner.execute(scheduled, [r for _, r, _ in scoring])  # [B, V], [E, V]
        self._steps += 1

        sampling: list[int] = []  # rows of sequences whose whole context is now in the cache
        for row, (seq, n) in enumerate(zip(scheduled.seqs, scheduled.num_new_tokens)):
            seq.num_computed_tokens += n
            self.blocks.commit(seq)  # its K/V are written now: full blocks may serve other requests
            if seq.num_computed_tokens == seq.num_tokens:
                sampling.append(row)
        if scoring:
            self._add_prompt_logprobs(scoring, extra)
        step = LaunchedStep()
        kept = []
        for r in sampling:
            seq = scheduled.seqs[r]
            if seq.num_tokens >= seq.max_total_tokens:  # max_tokens 0: the prompt was only scored
                step.outputs.append(self._text(seq, self._finish(seq, "length", None)))
                continue
            if seq.slot is None:
                try:
                    seq.slot = self.slots.acquire(seq.params, seq.token_ids, seq.num_prompt_tokens, self._stop_ids(seq))
                except Exception as exc:  # noqa: BLE001 - this request's own values: only it fails
                    log.exception("request %s: its sampling parameters failed at admission to a slot", seq.request_id)
                    step.outputs.append(self._fail(seq, exc))
                    continue
            kept.append((r, seq))
        if not kept:
            return step
        rows, seqs = [r for r, _ in kept], [s for _, s in kept]
        device = logits.device
        row_logits = logits if len(rows) == len(scheduled) else logits[h2d(torch.tensor(rows), device)]
        # masks were computed on grammar threads; a sequence admitted in this very step may still
        # wait for its first one (the scheduler holds back the rest until theirs are done)
        constrained = [(i, s.grammar_mask.result()) for i, s in enumerate(seqs) if s.matcher is not None]
        allowed = self.grammars.masks_of(constrained, len(seqs), device) if constrained else None
        slot_ids = h2d(torch.tensor([s.slot for s in seqs], dtype=torch.long), device)
        flags = [self.slots.flags[s.slot] for s in seqs]
        step.seqs = seqs
        try:
            sampled = self.sampler(row_logits, slot_ids, flags, allowed)
            self.runner.publish(sampled.tokens)
            step.results = sampled.start_copy()
        except Exception:  # noqa: BLE001 - find the rows to blame instead of failing the batch
            log.exception("sampling a batch of %d failed; re-sampling row by row", len(seqs))
            step.per_row = [self._sample_one(row_logits, slot_ids, flags, allowed, i) for i in range(len(seqs))]
            step.index = [None] * len(seqs)
            return step
        for i, seq in enumerate(seqs):  # the next step may feed these tokens before they are known here
            seq.token_ids.append(PENDING)
            seq.pending_row = i
        step.index = [s.num_tokens - 1 for s in seqs]
        return step

    def _complete(self, step: LaunchedStep) -> list[RequestOutput]:
        """A launched step's tokens into their sequences: stop checks, text, outputs."""
        outputs = step.outputs
        if not step.seqs:
            return outputs
        tokens, logprobs = step.results.get() if step.results is not None else (None, None)
        for i, seq in enumerate(step.seqs):
            if step.per_row is not None:
                result = step.per_row[i]
                if isinstance(result, BaseException):
                    outputs.append(self._fail(seq, result))
                    continue
                (tok,), lps = result
                row_lp = None if lps is None else lps[0]
            else:
                tok = tokens[i]
                row_lp = None if logprobs is None else logprobs[i]
            if seq.finished:  # finished or aborted while this step was in flight: a dropped row
                continue
            self._tokens_generated += 1
            lp = None if row_lp is None or seq.params.logprobs is None else _token_logprob(tok, row_lp, seq.params.logprobs)
            try:
                outputs.append(self._accept_token(seq, step.index[i], tok, lp))
            except Exception as exc:  # noqa: BLE001 - e.g. its text stream: only this request fails
                log.exception("request %s: handling its sampled token failed", seq.request_id)
                outputs.append(self._fail(seq, exc))
        return outputs

    def _wait_for_grammar_masks(self, timeout_s: float = 0.01) -> None:
        """Nothing could run because every runnable sequence waits for its grammar mask: wait a
        little for one (bounded, so the caller's step-boundary hooks keep running) instead of spinning."""
        pending = [s.grammar_mask for s in self.scheduler.running if not s.grammar_ready()]
        if pending:
            concurrent.futures.wait(pending, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    def _sample_one(self, row_logits, slot_ids, flags, allowed, i: int):
        """Row i alone: (tokens, logprobs) of a one-row step, or the exception it raises."""
        try:
            mask = None if allowed is None else allowed[i:i + 1]
            return self.sampler(row_logits[i:i + 1], slot_ids[i:i + 1], [flags[i]], mask).to_host()
        except Exception as exc:  # noqa: BLE001 - this request's own values: only it fails
            return exc

    def _fail(self, seq: Sequence, error: BaseException) -> RequestOutput:
        """Finish one request whose sampling failed; its output carries the error."""
        self.scheduler.finish(seq, "abort")
        self._release_slot(seq)
        self._forget(seq)
        out = self._output(seq, [])
        out.error = error
        return out

    # ---- per-request extras: stop ids, prompt log-probabilities, slots ---------------------------

    def _stop_ids(self, seq: Sequence) -> list[int]:
        """Ids that min_tokens holds back: the request's stop ids and, unless ignored, EOS."""
        ids = list(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            ids += sorted(self.eos_token_ids)
        return ids

    def _prompt_rows(self, scheduled) -> list[tuple[Sequence, int, int]]:
        """For sequences that want prompt logprobs: every position of this step's chunk that predicts a
        prompt token (position p predicts token p + 1), as (seq, row in the flattened step, token)."""
        rows: list[tuple[Sequence, int, int]] = []
        start = 0
        for seq, n in zip(scheduled.seqs, scheduled.num_new_tokens):
            if seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens:
                first = seq.num_computed_tokens
                for p in range(max(first, len(seq.prompt_logprobs) - 1), min(first + n, seq.num_prompt_tokens - 1)):
                    rows.append((seq, start + p - first, seq.token_ids[p + 1]))
            start += n
        return rows

    def _add_prompt_logprobs(self, scoring: list[tuple[Sequence, int, int]], logits) -> None:
        ks = [s.params.prompt_logprobs for s, _, _ in scoring]
        targets = torch.tensor([t for _, _, t in scoring], dtype=torch.long, device=logits.device)
        for (seq, _, _), entry in zip(scoring, prompt_logprobs(logits, targets, ks)):
            seq.prompt_logprobs.append(entry)

    def _release_slot(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.slots.release(seq.slot)
            seq.slot = None

    def _mark_scheduled(self, seqs: list[Sequence]) -> None:
        """Queue time ends when a step first runs a request (a preempted one keeps its first time)."""
        now = None
        for seq in seqs:
            if seq.scheduled_at is None:
                seq.scheduled_at = now = now or self.clock()

    def _accept_token(self, seq: Sequence, index: int | None, token: int,
                      logprob: TokenLogprob | None = None) -> RequestOutput:
        """The token sampled for position `index` of the sequence (its PENDING placeholder; None:
        append it)."""
        if index is None:
            seq.token_ids.append(token)
            index = seq.num_tokens - 1
        else:
            seq.token_ids[index] = token
            if index == seq.num_tokens - 1:
                seq.pending_row = None
        params = seq.params
        if seq.first_token_at is None:
            seq.first_token_at = self.clock()
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            # the stop token counts as a completion token but is not part of the text
            out = self._finish(seq, "stop", token)
            out.ends_with_stop_token = True
        elif seq.matcher is not None and seq.matcher.is_error():  # e.g. the parser's limits: never a cut answer
            return self._fail(seq, RequestRejected(
                f"the output grammar could not continue after {seq.num_completion_tokens} tokens: "
                f"{seq.matcher.get_error().splitlines()[0][:300]}"))
        elif seq.matcher is not None and seq.matcher.is_stopped():
            out = self._finish(seq, "stop", token)
        elif index + 1 >= seq.max_total_tokens:
            out = self._finish(seq, "length", token)
        else:
            out = self._output(seq, [token])
        out = self._text(seq, out)
        if not out.finished and seq.matcher is not None:
            seq.grammar_mask = self.grammars.prefetch(seq.matcher)
        return out

    def _text(self, seq: Sequence, out: RequestOutput) -> RequestOutput:
        """With make_text: the output's text; a stop string that ends the request finishes it here."""
        if seq.text_stream is None:
            return out
        running = not out.finished
        seq.text_stream.apply(out)
        if running and out.finished:
            self._retire(seq, "stop")
        return out

    def _finish(self, seq: Sequence, reason: str, token: int | None) -> RequestOutput:
        self._retire(seq, reason)
        return self._output(seq, [] if token is None else [token])

    def _retire(self, seq: Sequence, reason: str) -> None:
        """Out of the scheduler, its slot and the engine's books; a token sampled past the end (async
        scheduling: already launched) is dropped."""
        self.scheduler.finish(seq, reason)
        self._release_slot(seq)
        self._forget(seq)
        del seq.token_ids[len(seq.token_ids) - seq.num_pending:]

    def _forget(self, seq: Sequence) -> None:
        self._seqs.pop(seq.request_id, None)
        self._sync_requests.discard(seq.request_id)

    def _output(self, seq: Sequence, new_ids: list[int]) -> RequestOutput:
        """Token ids and state; the text is left to the request's TextStream."""
        logprobs, seq.pending_logprobs = (seq.pending_logprobs or None), []
        prompt_lps = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            prompt_lps, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text="",
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_completion_tokens - seq.num_pending,
            cached_tokens=seq.num_cached_tokens or 0,
            logprobs=logprobs,
            prompt_logprobs=prompt_lps,
            scheduled_at=seq.scheduled_at,
            first_token_at=seq.first_token_at,
            produced_at=self.clock(),
        )


def _token_logprob(token: int, row: tuple[float, list[tuple[int, float]]], k: int) -> TokenLogprob:
    logprob, top = row
    return TokenLogprob(token, logprob, top[:k])


def _check_sampling(params: SamplingParams) -> None:
    """Build, once, the tensors the sampling slots hold for these values (floats, int64 top_k and
    seed) and a seeded generator, so a value that cannot become one is refused at admission rather
    than inside a shared step."""
    floats = [getattr(params, name, 0.0) for name in
              ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")]
    try:
        torch.tensor([float(v) for v in floats], dtype=torch.float32)
        torch.tensor([int(params.top_k)], dtype=torch.int64)
        if params.seed is not None:
            torch.tensor([int(params.seed)], dtype=torch.int64)
            torch.Generator().manual_seed(int(params.seed))
    except (RuntimeError, OverflowError, TypeError, ValueError) as exc:
        raise RequestRejected(f"sampling parameters out of range: {exc}") from exc
    if not all(v == v and abs(v) < float("inf") for v in floats):
        raise RequestRejected("sampling parameters must be finite numbers")
