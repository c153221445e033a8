"""Grammar-constrained decoding: JSON schemas, JSON objects and tool-call formats, through llguidance.

Why llguidance (measured in docs/api.md): a 3 MB wheel with no Python dependencies (xgrammar needs
torch, transformers and triton; outlines-core is as small but compiles each schema into a full
token-level index up front, seconds for a nested schema on a large vocabulary), masks computed lazily
per token in tens of microseconds, and a Lark front end with embedded JSON schemas (`%json{...}`), which
the tool-call format (`<tool_call>` + JSON + `</tool_call>`) needs.

Flow: the front compiles a GrammarSpec at admission (GrammarCompiler.check: a bad schema is a 400
before any engine work); the engine gives each constrained sequence its own LLMatcher; every step it
asks the matchers of that step's constrained rows for their next-token bitmasks (host, while the
device runs the forward), copies the [B, V/32] int32 bitmask to the device once, and the sampler
masks disallowed tokens to -inf. Unconstrained rows get an all-ones row, so the rest of the batch is
neither stalled nor changed. After the step each matcher consumes its sampled token.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import Any

import torch

from actors.engine.request_rejected import RequestRejected

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
            try:
                schema = json.loads(self.value)
            except ValueError as e:
                raise RequestRejected(f"the JSON schema is not valid JSON: {e}") from e
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.value)
        raise RequestRejected(f"unknown grammar kind {self.kind!r}")


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
    large vocabulary) and a cache of validated grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._lock = threading.Lock()
        self._ll = None
        self._executor = None

    @property
    def ll_tokenizer(self):
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

    def check(self, spec: GrammarSpec) -> str:
        """The grammar text of spec, validated against the tokenizer; RequestRejected if invalid."""
        return self._validated(spec)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one compiler per engine, lives as long as it
    def _validated(self, spec: GrammarSpec) -> str:
        import llguidance

        try:
            source = spec.source()
        except ValueError as e:
            raise RequestRejected(f"invalid grammar: {e}") from e
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, self.ll_tokenizer)
        if is_error:
            raise RequestRejected(f"invalid {spec.kind.replace('_', ' ')}: {messages[0] if messages else 'rejected'}")
        return source

    def matcher(self, spec: GrammarSpec):
        import llguidance

        return llguidance.LLMatcher(self.ll_tokenizer, self._validated(spec), log_level=0)

    def fill_masks(self, rows: list[tuple[int, Any]], batch: int, device: torch.device) -> torch.Tensor:
        """[B, V] bool allowed-token mask on `device`: rows [(row, matcher)] from their matchers,
        every other row all True. One host->device copy of the packed [B, V/32] bitmask."""
        import llguidance
        from llguidance.torch import fill_next_token_bitmask_par

        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((batch, words), -1, dtype=torch.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        fill_next_token_bitmask_par(self._executor, [(m, row) for row, m in rows], bitmask)
        return unpack_bitmask(bitmask.to(device, non_blocking=True), self.vocab_size)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, W] int32 (bit j of word w = token 32w + j) -> [B, V] bool, on bitmask's device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()
