import pytest
import torch

from actors.engine.request_rejected import RequestRejected
from actors.engine.sampler import Sampler, make_generator
from actors.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_for_every_row():
    logits = random_logits(5, 50, 0)
    tokens = Sampler()(logits, [SamplingParams(temperature=0)] * 5, [None] * 5)
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy_even_with_temperature():
    logits = random_logits(4, 50, 1)
    params = [SamplingParams(temperature=2.0, top_k=1)] * 4
    assert Sampler()(logits, params, [make_generator(i, CPU) for i in range(4)]).tolist() == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_stay_argmax():
    logits = random_logits(6, 40, 2)
    params = [SamplingParams(temperature=0 if i % 2 else 1.5) for i in range(6)]
    tokens = Sampler()(logits, params, [make_generator(i, CPU) for i in range(6)])
    assert tokens[1::2].tolist() == logits[1::2].argmax(-1).tolist()


def draw(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int) -> torch.Tensor:
    """n samples of one distribution, drawn as n rows of one batch (each row its own seed)."""
    gens = [make_generator(seed + i, CPU) for i in range(n)]
    return Sampler()(logits_row.expand(n, -1), [params] * n, gens)


def test_top_k_limits_the_support_to_the_k_best():
    row = random_logits(1, 30, 3)[0]
    tokens = set(draw(row, SamplingParams(temperature=5.0, top_k=3), 300, 0).tolist())
    assert tokens == set(row.topk(3).indices.tolist())


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    row = probs.log()
    assert set(draw(row, SamplingParams(top_p=0.7), 300, 0).tolist()) == {1, 3}  # 0.5 + 0.3 >= 0.7
    assert set(draw(row, SamplingParams(top_p=0.85), 300, 0).tolist()) == {1, 2, 3}
    assert set(draw(row, SamplingParams(top_p=0.4), 100, 0).tolist()) == {1}


def test_temperature_sampling_follows_the_tempered_distribution():
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 4000
    for temperature in (0.5, 2.0):
        tokens = draw(row, SamplingParams(temperature=temperature), n, 100)
        freq = torch.bincount(tokens, minlength=4).float() / n
        expected = (row / temperature).softmax(-1)
        assert torch.allclose(freq, expected, atol=0.03), (temperature, freq, expected)


def test_a_seed_gives_the_same_tokens_whoever_shares_the_batch():
    vocab = 64
    target = random_logits(1, vocab, 7)  # the seeded request's logits at every step
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=1234)

    def run(batch_size: int, position: int, mates_seed: int) -> list[int]:
        gen = make_generator(1234, CPU)
        mates = random_logits(batch_size, vocab, mates_seed)
        out = []
        for _ in range(12):
            logits = mates.clone()
            logits[position] = target[0]
            mate_params = [SamplingParams(temperature=0.7)] * batch_size
            mate_gens: list = [None] * batch_size
            mate_params[position], mate_gens[position] = params, gen
            out.append(int(Sampler()(logits, mate_params, mate_gens)[position]))
        return out

    alone = run(1, 0, 0)
    assert run(5, 3, 11) == alone
    assert run(9, 0, 12) == alone
    assert len(set(alone)) > 1  # really sampling, not a degenerate distribution

    other = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=99)
    g = make_generator(99, CPU)
    other_tokens = [int(Sampler()(target, [other], [g])[0]) for _ in range(12)]
    assert other_tokens != alone


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"max_tokens": 0}])
def test_invalid_sampling_values_are_rejected_with_a_message(kwargs):
    with pytest.raises(RequestRejected, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_stop_accepts_a_single_string_and_drops_empty_ones():
    assert SamplingParams(stop="\n").stop == ["\n"]
    assert SamplingParams(stop=["", "x"]).stop == ["x"]
