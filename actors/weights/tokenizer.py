"""Tokenizers: text <-> ids, special ids, chat template.

ByteTokenizer serves the random-weight presets (ids 0..255 are bytes, then BOS, EOS, PAD);
HFTokenizer wraps a checkpoint's tokenizer.json with the `tokenizers` package and renders the
tokenizer_config.json chat template in a jinja2 sandbox. decode never raises on a cut UTF-8
sequence (it yields U+FFFD); the engine detokenizes incrementally on top of that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from actors.model.presets import BYTE_BOS, BYTE_EOS, BYTE_PAD


class Tokenizer(Protocol):
    eos_token_ids: list[int]
    bos_token_id: int | None
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str: ...


class ChatTemplateError(ValueError):
    """Messages the template cannot render (a user error: answer 4xx)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e


# A plain role-tagged template for the byte presets (the specials are ids, not text, so tags are text).
BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ByteTokenizer:
    def __init__(
        self, vocab_size: int = 512, bos_token_id: int = BYTE_BOS, eos_token_ids: tuple[int, ...] = (BYTE_EOS,)
    ) -> None:
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = BYTE_PAD
        self.chat_template = BYTE_CHAT_TEMPLATE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # ids above 255 are specials or unused vocabulary rows of a random model: no text.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        return render_chat_template(self.chat_template, messages, add_generation_prompt, tools=tools)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class HFTokenizer:
    def __init__(
        self,
        tokenizer,  # tokenizers.Tokenizer
        eos_token_ids: list[int],
        bos_token_id: int | None,
        chat_template: str | None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as RawTokenizer

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        tok = RawTokenizer.from_file(str(path / "tokenizer.json"))
        tcfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")

        bos_text, eos_text = _token_text(tcfg.get("bos_token")), _token_text(tcfg.get("eos_token"))
        eos_ids = _as_id_list(gen.get("eos_token_id")) or _as_id_list(model_cfg.get("eos_token_id"))
        if not eos_ids and eos_text is not None and tok.token_to_id(eos_text) is not None:
            eos_ids = [tok.token_to_id(eos_text)]
        bos_id = gen.get("bos_token_id", model_cfg.get("bos_token_id"))
        if bos_id is None and bos_text is not None:
            bos_id = tok.token_to_id(bos_text)
        if bos_text is None and bos_id is not None:
            bos_text = tok.id_to_token(bos_id)
        if eos_text is None and eos_ids:
            eos_text = tok.id_to_token(eos_ids[0])
        return cls(tok, eos_ids, bos_id, _chat_template(path, tcfg), bos_text, eos_text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            tools=tools,
        )


def _chat_template(path: Path, tcfg: dict) -> str | None:
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (path / "chat_template.jinja").is_file():  # transformers >= 4.43 saves it apart
        template = (path / "chat_template.jinja").read_text()
    return template
