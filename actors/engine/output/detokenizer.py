"""Token ids in, text deltas out, one token at a time, with stop strings applied.

Two things make streaming text harder than decode(all ids):
- a token may end in the middle of a UTF-8 character (byte-level tokenizers): the decoded text
  then ends in U+FFFD, and we wait for the next token instead of emitting a broken character;
- some tokenizers decode a token differently at the start of a string (SentencePiece drops the
  leading space), so each delta is decoded together with the tokens before it and only the new
  tail is emitted.

Stop strings are cut out of the output as in OpenAI: text up to the first match is emitted, the
match and everything after it are not. Text that could be the beginning of a stop string is held
back until the following tokens show whether it is one.
"""

from __future__ import annotations

from typing import Protocol

_BROKEN = "\ufffd"
_CONTEXT_TOKENS = 4  # prompt tokens decoded with the first output token, for leading-space rules


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str = include_stop_str  # vLLM's include_stop_str_in_output
        self.stop = list(stop)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # window start: tokens decoded only as context
        self._read = len(self._ids)  # tokens up to here have been turned into text
        self._held = ""  # decoded text that may be the start of a stop string
        self.stopped = False  # a stop string was found; nothing more will be emitted
        self.text = ""  # everything emitted so far

    def step(self, token_id: int) -> str:
        """Add one generated token; return the text that can be shown now (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix :])
        if window.endswith(_BROKEN):
            return ""  # incomplete character: wait for the bytes of the next token
        known = self._decode(self._ids[self._prefix : self._read])
        new = window[len(known) :] if window.startswith(known) else window
        self._prefix, self._read = self._read, len(self._ids)
        return self._emit(self._held + new)

    def flush(self) -> str:
        """The request finished for another reason: release held text and any dangling bytes."""
        if self.stopped:
            return ""
        window = self._decode(self._ids[self._prefix :])
        known = self._decode(self._ids[self._prefix : self._read])
        tail = window[len(known) :] if window.startswith(known) else ""
        self._prefix = self._read = len(self._ids)
        return self._emit(self._held + tail, final=True)

    def _decode(self, ids: list[int]) -> str:
        if self.skip_special_tokens:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _emit(self, buf: str, final: bool = False) -> str:
        """Emit buf up to the first stop string (through it with include_stop_str); unless final,
        hold back a possible stop start."""
        found = [(i, s) for s in self.stop if (i := buf.find(s)) >= 0]
        cut = min(found)[0] if found else -1
        if cut >= 0 and self.include_stop_str:
            cut += len(min(found)[1])
        if cut >= 0:
            self.stopped = True
            buf, self._held = buf[:cut], ""
        else:
            hold = 0 if final else self._stop_prefix_len(buf)
            buf, self._held = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += buf
        return buf

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of some stop string."""
        for n in range(min(len(buf), self._longest_stop - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
