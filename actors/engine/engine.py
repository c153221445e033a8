"""The serving engine of one attention replica: requests in, token/text deltas out, one step at a
time. Single-threaded; actors/engine/async_engine.py drives it from a background thread.

A step: the scheduler picks sequences and token counts, the model runner (actors/engine/model_runner.py)
turns them into last-token logits, the sequences whose whole context is now computed sample a token,
and stop conditions and text deltas are worked out.

Shape legend: T = tokens in the step, B = sequences in the step, M = widest block table, V = vocab.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from actors.engine.block_manager import BlockManager
from actors.engine.detokenizer import IncrementalDetokenizer
from actors.engine.request_rejected import RequestRejected
from actors.engine.sampler import Sampler
from actors.engine.sampling.grammar import GrammarCompiler
from actors.engine.sampling.logprobs import TokenLogprob, prompt_logprobs
from actors.engine.sampling.slots import SlotTable
from actors.engine.sampling_params import SamplingParams
from actors.engine.model_runner import ModelRunner
from actors.engine.scheduler import Scheduler
from actors.engine.sequence import Sequence
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


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # 'stop' | 'length' | 'abort' | None while running
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # per new token when the request asked for logprobs (raw model log-probabilities)
    logprobs: list[TokenLogprob] | None = None
    # once, in the first output, when it asked for prompt_logprobs: None for the first prompt token
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: BaseException | None = None  # set when this request alone failed inside a step


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
            graph_memory_mb=spec.cuda_graph_memory_mb,
        )
        self.kv = self.runner.kv
        self.blocks = BlockManager(spec.num_kv_blocks, spec.block_size, spec.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, spec.max_num_seqs, spec.max_num_batched_tokens)
        self.slots = SlotTable(spec.max_num_seqs, self.cfg.vocab_size, self.runner.device)
        self.sampler = Sampler(self.slots)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.cfg.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.cfg.vocab_size, sorted(self.eos_token_ids))
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._tokens_generated = 0
        self._steps = 0

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

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._seqs:
            raise RequestRejected(f"request id {request_id!r} is already running")
        max_tokens = self.check_request(prompt_token_ids, params)
        prompt = [int(t) for t in prompt_token_ids]
        seq = Sequence(
            request_id=request_id,
            token_ids=list(prompt),
            num_prompt_tokens=len(prompt),
            params=params,
            max_total_tokens=len(prompt) + max_tokens,
            arrival=next(self._arrivals),
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, prompt, params.stop, params.skip_special_tokens, params.include_stop_str_in_output
            ),
            matcher=None if params.grammar is None else self.grammars.matcher(params.grammar),
            prompt_logprobs=None if params.prompt_logprobs is None else [None],
        )
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request wherever it is and free its KV blocks; None if it is not known."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        self._release_slot(seq)
        return self._output(seq, [], "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

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
        kernels.set_batch_invariant(self.spec.batch_invariant)  # the mode is the process's; engines may share one
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
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
        outputs: list[RequestOutput] = []
        seqs = []
        for r in sampling:
            seq = scheduled.seqs[r]
            if seq.num_tokens >= seq.max_total_tokens:  # max_tokens 0: the prompt was only scored
                outputs.append(self._finish(seq, "length", None, seq.detokenizer.flush()))
            else:
                seqs.append((r, seq))
        if not seqs:
            return outputs
        rows = [r for r, _ in seqs]
        seqs = [s for _, s in seqs]
        kept = []
        for r, seq in zip(rows, seqs):
            if seq.slot is None:
                try:
                    seq.slot = self.slots.acquire(seq.params, seq.token_ids, seq.num_prompt_tokens, self._stop_ids(seq))
                except Exception as exc:  # noqa: BLE001 - this request's own values: only it fails
                    log.exception("request %s: its sampling parameters failed at admission to a slot", seq.request_id)
                    outputs.append(self._fail(seq, exc))
                    continue
            kept.append((r, seq))
        if not kept:
            return outputs
        rows, seqs = [r for r, _ in kept], [s for _, s in kept]
        row_logits = logits if len(rows) == len(scheduled) else logits[rows]
        constrained = [(i, s.matcher) for i, s in enumerate(seqs) if s.matcher is not None]
        allowed = self.grammars.fill_masks(constrained, len(seqs), row_logits.device) if constrained else None
        slot_ids = torch.tensor([s.slot for s in seqs], dtype=torch.long).to(row_logits.device, non_blocking=True)
        flags = [self.slots.flags[s.slot] for s in seqs]
        try:
            results = [self.sampler(row_logits, slot_ids, flags, allowed).to_host()]
            per_row = False
        except Exception:  # noqa: BLE001 - find the rows to blame instead of failing the batch
            log.exception("sampling a batch of %d failed; re-sampling row by row", len(seqs))
            results = [self._sample_one(row_logits, slot_ids, flags, allowed, i) for i in range(len(seqs))]
            per_row = True
        for i, seq in enumerate(seqs):
            result = results[i] if per_row else results[0]
            if isinstance(result, BaseException):
                outputs.append(self._fail(seq, result))
                continue
            tokens, logprobs = result
            j = 0 if per_row else i
            tok = tokens[j]
            self._tokens_generated += 1
            lp = None if logprobs is None or seq.params.logprobs is None else _token_logprob(tok, logprobs[j], seq.params.logprobs)
            outputs.append(self._append_token(seq, tok, lp))
        return outputs

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
        self._seqs.pop(seq.request_id, None)
        out = self._output(seq, [], "")
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

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        seq.token_ids.append(token)
        params = seq.params
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            # the stop token counts as a completion token but is not part of the text
            return self._finish(seq, "stop", token, seq.detokenizer.flush())
        text = seq.detokenizer.step(token)
        if seq.detokenizer.stopped:
            return self._finish(seq, "stop", token, text)
        if seq.matcher is not None and (seq.matcher.is_stopped() or seq.matcher.is_error()):
            return self._finish(seq, "stop", token, text + seq.detokenizer.flush())
        if seq.num_tokens >= seq.max_total_tokens:
            return self._finish(seq, "length", token, text + seq.detokenizer.flush())
        return self._output(seq, [token], text)

    def _finish(self, seq: Sequence, reason: str, token: int | None, text: str) -> RequestOutput:
        self.scheduler.finish(seq, reason)
        self._release_slot(seq)
        del self._seqs[seq.request_id]
        return self._output(seq, [] if token is None else [token], text)

    @staticmethod
    def _output(seq: Sequence, new_ids: list[int], text: str) -> RequestOutput:
        logprobs, seq.pending_logprobs = (seq.pending_logprobs or None), []
        prompt_lps = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            prompt_lps, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=text,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_completion_tokens,
            cached_tokens=seq.num_cached_tokens or 0,
            logprobs=logprobs,
            prompt_logprobs=prompt_lps,
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
