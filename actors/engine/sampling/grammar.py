"""Grammar-constrained decoding: JSON schemas, JSON objects and tool-call formats, through llguidance.

Why llguidance (measured in docs/api.md): a 3 MB wheel with no Python dependencies (xgrammar needs
torch, transformers and triton; outlines-core is as small but compiles each schema into a full
token-level index up front, seconds for a nested schema on a large vocabulary), masks computed lazily
per token in tens of microseconds, and a Lark front end with embedded JSON schemas (`%json{...}`), which
the tool-call format (`<tool_call>` + JSON + `</tool_call>`) needs.

Flow, and where each part runs (no grammar work on the engine's step thread or on the replica's
event loop, beyond copying a matcher and filling masks):
- start-up (`warm`): llguidance imported, the tokenizer view built, the mask executor made and one
  mask filled, so the first constrained request pays none of it;
- admission (`submit`, awaited by AsyncEngine.compile_grammar under a time budget): a worker thread
  turns the spec into a CompiledGrammar — one template LLMatcher (llguidance drops the GIL while it
  builds the grammar) whose first mask is computed there too (it builds the lazy lexer). A spec over
  `max_bytes`, an invalid one, or one that does not compile in time is a RequestRejected (400);
- add_request: each sequence gets `deep_copy()` of the template (tens of microseconds, however big the
  schema), so n choices never compile n times;
- every step: the matchers of that step's constrained rows fill their rows of one [B, V/32] int32
  bitmask (host, in parallel, while the device runs the forward), copied to the device once; the
  sampler masks disallowed tokens to -inf. Unconstrained rows are all ones: the rest of the batch is
  neither stalled nor changed. After the step each matcher consumes its sampled token.
`llguidance.torch` is not used: its import compiles a kernel with torch.compile (importing
torch._dynamo, seconds); the one call it would wrap is made on the executor directly.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from actors.engine.request_rejected import RequestRejected

log = logging.getLogger(__name__)
MAX_ITEMS_IN_ROW = 50_000
COMPACT_JSON = {"whitespace_flexible": False}  # one canonical spacing: fewer tokens, no whitespace runs


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to. kind: 'json_schema' (value: the schema as JSON text),
    'json_object' (any JSON object), or 'lark' (value: a Lark grammar, may embed %json{...})."""

    kind: str
    value: str = ""

    def source(self) -> str:
        """The llguidance grammar text."""
        import llguidance

        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=COMPACT_JSON)
        if self.kind == "json_schema":
            # the text, not a parsed dict: llguidance converting a big dict holds the GIL (~80 ms for
            # 5,000 properties), parsing the text itself does not stall the other threads as long
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(self.value, defaults=COMPACT_JSON)
            except ValueError as e:
                raise RequestRejected(f"invalid JSON schema: {e}") from e
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.value)
        raise RequestRejected(f"unknown grammar kind {self.kind!r}")


@dataclass(frozen=True)
class GrammarLimits:
    max_bytes: int = 512 << 10  # of the spec's text (schema JSON or Lark)
    compile_timeout_s: float = 10.0  # AsyncEngine.compile_grammar's budget
    workers: int = 1  # compile threads, and as many mask threads
    cached: int = 64  # compiled grammars kept (least recently used dropped)


class CompiledGrammar:
    """A grammar compiled once; every sequence constrained by it gets its own copy of the matcher."""

    def __init__(self, spec: GrammarSpec, template: Any) -> None:
        self.spec = spec
        self._template = template

    def matcher(self):
        return self._template.deep_copy()


def lark_json(schema: dict) -> str:
    """A schema embedded in a Lark grammar, compact like the JSON grammars."""
    return "%json " + json.dumps({**schema, "x-guidance": COMPACT_JSON})


class _ByteVocab:
    """The byte presets' tokenizer as llguidance sees it: ids 0..255 are bytes, the rest specials."""

    def __init__(self, vocab_size: int, eos: int, bos: int | None) -> None:
        self.eos_token_id = eos
        self.bos_token_id = bos
        self.tokens = [bytes([i]) for i in range(256)] + [f"<|special_{i}|>".encode() for i in range(256, vocab_size)]
        self.special_token_ids = list(range(256, vocab_size))

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


class GrammarCompiler:
    """One per engine: the llguidance view of the engine's tokenizer (built on first use, ~1 s for a
    large vocabulary), the compile threads and a cache of compiled grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int],
                 limits: GrammarLimits = GrammarLimits()) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.limits = limits
        self._eos = list(eos_token_ids)
        self._lock = threading.Lock()
        self._ll = None
        self._executor = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._mask_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()

    @property
    def ll_tokenizer(self):
        try:
            return self._tokenizer_view()
        except ValueError as e:  # e.g. EOS outside the vocabulary: no grammar can be built for it
            raise RequestRejected(f"structured output is not available for this model's tokenizer: {e}") from e

    def _tokenizer_view(self):
        with self._lock:
            if self._ll is None:
                import llguidance

                raw = getattr(self._tokenizer, "_tok", None)  # HFTokenizer's tokenizers.Tokenizer
                if raw is not None:
                    self._ll = llguidance.LLTokenizer(raw.to_str(), n_vocab=self.vocab_size, eos_token=self._eos)
                else:
                    wrapper = llguidance.TokenizerWrapper(
                        _ByteVocab(self.vocab_size, self._eos[0], getattr(self._tokenizer, "bos_token_id", None))
                    )
                    self._ll = llguidance.LLTokenizer(wrapper, n_vocab=self.vocab_size, eos_token=self._eos)
            return self._ll

    def warm(self) -> None:
        """Pay at start-up what the first constrained request would: the import, the tokenizer view,
        the mask executor, and one grammar compiled and masked. A tokenizer llguidance cannot take
        leaves the server up: its constrained requests get that reason as a 400."""
        try:
            compiled = self.compile(GrammarSpec("json_object"))
            self.fill_masks([(0, compiled.matcher())], 1, torch.device("cpu"))
        except RequestRejected as e:
            log.warning("structured output is unavailable for this model: %s", e)

    def submit(self, spec: GrammarSpec) -> concurrent.futures.Future:
        """Compile on a worker thread; the future holds the CompiledGrammar or a RequestRejected."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
            elif self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.limits.workers, thread_name_prefix="grammar")
        if hit is not None:
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(hit)
            return done
        return self._pool.submit(self.compile, spec)

    def check(self, spec: "GrammarSpec | CompiledGrammar") -> None:
        """RequestRejected if spec is invalid (compiled here, on the caller's thread, if need be)."""
        if not isinstance(spec, CompiledGrammar):
            self.compile(spec)

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of spec (cached); RequestRejected if it is too big or invalid."""
        import llguidance

        with self._lock:
            hit = self._cache.get(spec)
        if hit is not None:
            return hit
        if len(spec.value) > self.limits.max_bytes:
            raise RequestRejected(
                f"the {spec.kind.replace('_', ' ')} is {len(spec.value)} bytes; this server compiles at most "
                f"{self.limits.max_bytes} (engine.grammar_max_bytes)")
        try:
            source = spec.source()
        except ValueError as e:
            raise RequestRejected(f"invalid grammar: {e}") from e
        # drops the GIL while it builds; a wider row than llguidance's default (2,000 items) lets an
        # object with thousands of optional keys compile (its masks are computed off the step thread)
        limits = llguidance.LLParserLimits(max_items_in_row=MAX_ITEMS_IN_ROW)
        template = llguidance.LLMatcher(self.ll_tokenizer, source, log_level=0, limits=limits)
        if template.is_error():
            raise RequestRejected(f"invalid {spec.kind.replace('_', ' ')}: {template.get_error()}")
        template.compute_bitmask()  # builds the lazy lexer here, not in the first step's mask
        compiled = CompiledGrammar(spec, template)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self.limits.cached:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, grammar: "GrammarSpec | CompiledGrammar"):
        compiled = grammar if isinstance(grammar, CompiledGrammar) else self.compile(grammar)
        return compiled.matcher()

    def prefetch(self, matcher: Any) -> concurrent.futures.Future:
        """The matcher's next-token mask as a [V/32] int32 row, computed on a grammar-mask thread
        (llguidance drops the GIL): the first mask at a new grammar state can take a second (a
        lexer over thousands of keys is built lazily), which must not be a step's time."""
        with self._lock:
            if self._mask_pool is None:
                self._mask_pool = concurrent.futures.ThreadPoolExecutor(self.limits.workers, thread_name_prefix="grammar-mask")
        return self._mask_pool.submit(self._mask_row, matcher)

    def _mask_row(self, matcher: Any) -> torch.Tensor:
        row = torch.empty((self.vocab_size + 31) // 32, dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        return row

    def masks_of(self, rows: list[tuple[int, torch.Tensor]], batch: int, device: torch.device) -> torch.Tensor:
        """[B, V] bool allowed-token mask on `device` from prefetched rows [(row, [V/32] int32)];
        every other row all True. One host->device copy."""
        bitmask = torch.full((batch, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        for i, row in rows:
            bitmask[i] = row
        return unpack_bitmask(bitmask.to(device, non_blocking=True), self.vocab_size)

    def fill_masks(self, rows: list[tuple[int, Any]], batch: int, device: torch.device) -> torch.Tensor:
        """[B, V] bool allowed-token mask on `device`: rows [(row, matcher)] from their matchers,
        every other row all True. One host->device copy of the packed [B, V/32] bitmask."""
        import llguidance

        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((batch, words), -1, dtype=torch.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        # what llguidance.torch.fill_next_token_bitmask_par does, without importing that module
        self._executor.unsafe_compute_mask_ptr([(m, row) for row, m in rows], bitmask.data_ptr(), words * 4, batch)
        return unpack_bitmask(bitmask.to(device, non_blocking=True), self.vocab_size)

    def close(self) -> None:
        for pool in (self._pool, self._mask_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, W] int32 (bit j of word w = token 32w + j) -> [B, V] bool, on bitmask's device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()
