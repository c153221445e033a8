import random

from actors.engine.output.detokenizer import IncrementalDetokenizer
from actors.weights.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()


def stream(text: str, stop: list[str], prompt: str = "p") -> tuple[list[str], IncrementalDetokenizer]:
    """Feed text byte by byte; return every delta (flush included) and the detokenizer."""
    detok = IncrementalDetokenizer(BYTES, BYTES.encode(prompt), stop)
    deltas = [detok.step(b) for b in text.encode("utf-8")]
    deltas.append(detok.flush())
    return deltas, detok


def test_multibyte_characters_are_never_split():
    text = "naïve 😀 ünïcödé 中文"
    deltas, detok = stream(text, [])
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)
    assert "😀" in deltas  # emitted whole, once its fourth byte arrived


def test_invalid_bytes_become_one_replacement_character_and_streaming_continues():
    detok = IncrementalDetokenizer(BYTES, [], [])
    out = [detok.step(0xFF), detok.step(ord("a")), detok.step(ord("b")), detok.flush()]
    assert "".join(out) == "\ufffdab"


def test_a_stop_string_ends_the_text_before_it():
    deltas, detok = stream("Hello world! More text", ["world"])
    assert "".join(deltas) == "Hello " and detok.stopped


def test_text_that_may_start_a_stop_string_is_held_back_then_released():
    detok = IncrementalDetokenizer(BYTES, [], ["END"])
    assert [detok.step(b) for b in b"abE"] == ["a", "b", ""]
    assert detok.step(ord("N")) == ""
    assert detok.step(ord("d")) == "ENd"  # not END after all
    assert not detok.stopped


def test_held_text_is_flushed_when_the_request_ends_otherwise():
    detok = IncrementalDetokenizer(BYTES, [], ["\n\n"])
    assert [detok.step(b) for b in b"hi\n"] == ["h", "i", ""]
    assert detok.flush() == "\n"


def test_the_earliest_of_several_stop_strings_wins_inside_one_token():
    class Words:
        def decode(self, ids):
            return "".join(["one two ", "three", " four"][i] for i in ids)

    detok = IncrementalDetokenizer(Words(), [], ["four", "two"])
    assert detok.step(0) == "one " and detok.stopped
    assert detok.step(1) == "" and detok.flush() == ""


def test_leading_space_rules_of_sentencepiece_like_tokenizers_are_respected():
    pieces = ["▁Hello", "▁world", ",", "▁how", "▁are", "▁you"]

    class SentencePieceLike:  # decode drops the space of a leading "▁", like SentencePiece
        def decode(self, ids):
            return "".join(pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")

    tok = SentencePieceLike()
    detok = IncrementalDetokenizer(tok, [0], [])
    out = "".join(detok.step(i) for i in range(1, 6)) + detok.flush()
    assert out == " world, how are you" == tok.decode([0, 1, 2, 3, 4, 5])[len("Hello"):]


def test_streamed_text_equals_the_stop_truncated_text_for_random_inputs():
    rng = random.Random(0)
    alphabet = "ab\nä😀 "
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 2))]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[: min(hits)] if hits else text
        deltas, detok = stream(text, stops)
        assert "".join(deltas) == expected, (text, stops)
        assert detok.stopped == bool(hits)
        assert all("\ufffd" not in d for d in deltas)
