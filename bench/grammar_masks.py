"""Compare grammar libraries for structured output on the CPU: schema compile time and the cost of one
next-token mask along a valid JSON answer, on a 64k byte-level BPE vocabulary.

    python bench/grammar_masks.py --tokenizer tok.json [--xgrammar-path DIR]

The tokenizer is any HF tokenizer.json (this machine has no checkpoint; the figures in docs/api.md
used a 64k byte-level BPE trained with `tokenizers` on Python sources). xgrammar is imported from
--xgrammar-path when it is not installed (pip install --no-deps --target DIR xgrammar apache-tvm-ffi).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines"],
          "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"}}


def byte_decoder() -> dict[str, int]:
    alphabet = ByteLevel.alphabet()
    # GPT-2's table: printable bytes map to themselves, the rest to 256 + n in order
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = {chr(c): b for b, c in zip(bs, cs)}
    assert set(table) == set(alphabet)
    return table


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


def bench_llguidance(tok_json: str, eos: int, vocab: int, ids: list[int]) -> dict:
    import llguidance
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    ll, t_tok = timed(lambda: llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    m, t_compile = timed(lambda: llguidance.LLMatcher(ll, grammar))
    mask = allocate_token_bitmask(1, vocab)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        fill_next_token_bitmask(m, mask)
        times.append(time.perf_counter() - t0)
        assert m.consume_token(t), m.get_error()
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "mask_us": times}


def bench_xgrammar(raw: Tokenizer, eos: int, vocab: int, ids: list[int]) -> dict:
    import xgrammar as xgr

    encoded = [raw.id_to_token(i) for i in range(vocab)]
    info, t_tok = timed(lambda: xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=[eos]))
    compiler = xgr.GrammarCompiler(info)
    cg, t_compile = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")))
    m = xgr.GrammarMatcher(cg)
    mask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - t0)
        assert m.accept_token(t), f"xgrammar refused token {t} {raw.id_to_token(t)!r}"
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "mask_us": times}


def bench_outlines(raw: Tokenizer, eos: int, vocab: int, ids: list[int]) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    dec = byte_decoder()
    by_bytes: dict[bytes, list[int]] = {}
    for i in range(vocab):
        if i == eos:
            continue
        by_bytes.setdefault(bytes(dec[c] for c in raw.id_to_token(i)), []).append(i)
    v, t_tok = timed(lambda: Vocabulary(eos, by_bytes))
    regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    index, t_compile = timed(lambda: Index(regex, v))
    g = Guide(index)
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        g.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        times.append(time.perf_counter() - t0)
        if t != eos:  # the final state has no EOS transition: the guide is finished there
            g.advance(t)
    return {"tokenizer_s": t_tok, "compile_s": t_compile, "mask_us": times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--xgrammar-path")
    args = ap.parse_args()
    if args.xgrammar_path:
        sys.path.append(args.xgrammar_path)
    raw = Tokenizer.from_file(args.tokenizer)
    vocab = raw.get_vocab_size()
    eos = raw.token_to_id("<|endoftext|>")
    text = json.dumps(ANSWER, separators=(",", ":"))
    ids = raw.encode(text).ids + [eos]
    tok_json = open(args.tokenizer).read()
    print(f"vocab {vocab}, answer {len(ids)} tokens, torch threads {torch.get_num_threads()}")
    for name, fn in [("llguidance", lambda: bench_llguidance(tok_json, eos, vocab, ids)),
                     ("xgrammar", lambda: bench_xgrammar(raw, eos, vocab, ids)),
                     ("outlines-core", lambda: bench_outlines(raw, eos, vocab, ids))]:
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            print(f"{name:14s} failed: {type(e).__name__}: {e}")
            continue
        us = [t * 1e6 for t in r["mask_us"]]
        print(f"{name:14s} tokenizer {r['tokenizer_s']*1e3:8.1f} ms  compile {r['compile_s']*1e3:8.1f} ms  "
              f"mask median {statistics.median(us):7.1f} us  p90 {sorted(us)[int(0.9*len(us))]:7.1f} us  max {max(us):8.1f} us")


if __name__ == "__main__":
    main()
