"""Tokenizers: byte-level round trips, special ids from the checkpoint's json files, chat templates
rendered in the sandbox, cut UTF-8 decoded without raising."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from actors.weights.tokenizer import ByteTokenizer, ChatTemplateError, HFTokenizer

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "Grüße, 世界! tokens 🙂 and spaces  twice"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world, the quick brown fox", "grüße an die welt", "世界 你好"] * 20, trainer)
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}, "chat_template": CHATML})
    )
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["</s>"], ids["<|im_end|>"]]}))
    return path, ids


def test_hf_tokenizer_round_trip_and_special_ids(tokenizer_dir):
    path, ids = tokenizer_dir
    tok = HFTokenizer.from_dir(path)
    encoded = tok.encode(TEXT)
    assert len(encoded) < len(TEXT.encode())  # merges learned, not one id per byte
    assert tok.decode(encoded) == TEXT
    assert tok.eos_token_ids == [ids["</s>"], ids["<|im_end|>"]]
    assert tok.bos_token_id == ids["<s>"]
    assert tok.vocab_size == len(json.loads((path / "tokenizer.json").read_text())["model"]["vocab"])
    assert max(encoded) < tok.vocab_size


def test_chat_template_from_tokenizer_config(tokenizer_dir):
    path, ids = tokenizer_dir
    tok = HFTokenizer.from_dir(path)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages)
    assert text == "<s><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    encoded = tok.encode(text, add_special_tokens=False)
    assert encoded[0] == ids["<s>"] and encoded.count(ids["<|im_start|>"]) == 3


def test_chat_template_file_and_template_errors(tokenizer_dir, tmp_path):
    path, _ = tokenizer_dir
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_text((path / name).read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}[{{ messages[0]['content'] }}]"
    )
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"
    with pytest.raises(ChatTemplateError, match="user first"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ChatTemplateError, match="no chat template"):
        HFTokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_sandbox_refuses_unsafe_templates(tokenizer_dir, tmp_path):
    path, _ = tokenizer_dir
    (tmp_path / "tokenizer.json").write_text((path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages.__class__.__mro__[1].__subclasses__() }}"})
    )
    with pytest.raises(ChatTemplateError):
        HFTokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_byte_tokenizer_round_trip_specials_and_cut_utf8():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_token_id and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids + tok.eos_token_ids) == TEXT
    cut = tok.encode("🙂", add_special_tokens=False)[:2]  # half a 4-byte character
    assert tok.decode(cut) == "\ufffd"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.startswith("<|user|>\nhi\n") and chat.endswith("<|assistant|>\n")


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)
