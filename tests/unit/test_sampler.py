"""The sampler's math on the CPU: greedy, temperature, top-k/top-p/min_p, penalties, logit_bias,
min_tokens, raw logprobs, seeded determinism independent of the batch, grammar masks."""

import math

import pytest
import torch

from actors.engine.request_rejected import RequestRejected
from actors.engine.sampler import Sampler, apply_penalties, apply_top_k_top_p
from actors.engine.sampling.grammar import unpack_bitmask
from actors.engine.sampling.noise import uniform
from actors.engine.sampling.slots import SlotTable
from actors.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


class Harness:
    """A slot table + sampler with requests admitted in the given order."""

    def __init__(self, vocab: int, params: list[SamplingParams], prompts: list[list[int]] | None = None,
                 stop_ids: list[int] = (), slots: int | None = None) -> None:
        self.table = SlotTable(slots or max(1, len(params)), vocab, CPU)
        self.sampler = Sampler(self.table)
        prompts = prompts or [[0]] * len(params)
        self.slots = [self.table.acquire(p, pr, len(pr), list(stop_ids)) for p, pr in zip(params, prompts)]

    def __call__(self, logits: torch.Tensor, rows: list[int] | None = None, allowed=None):
        slots = self.slots if rows is None else [self.slots[r] for r in rows]
        out = self.sampler(logits, torch.tensor(slots), [self.table.flags[s] for s in slots], allowed)
        return out


def sample(logits: torch.Tensor, params: list[SamplingParams], **kw) -> list[int]:
    return Harness(logits.shape[1], params, **kw)(logits).tokens.tolist()


def test_greedy_is_argmax_for_every_row():
    logits = random_logits(5, 50, 0)
    assert sample(logits, [SamplingParams(temperature=0)] * 5) == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy_even_with_temperature():
    logits = random_logits(4, 50, 1)
    assert sample(logits, [SamplingParams(temperature=2.0, top_k=1, seed=i) for i in range(4)]) == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_stay_argmax():
    logits = random_logits(6, 40, 2)
    tokens = sample(logits, [SamplingParams(temperature=0 if i % 2 else 1.5, seed=i) for i in range(6)])
    assert tokens[1::2] == logits[1::2].argmax(-1).tolist()


def draw(row: torch.Tensor, params: SamplingParams, n: int, seed: int) -> list[int]:
    """n samples of one distribution, drawn as n rows of one batch (each row its own seed)."""
    ps = [SamplingParams(**{**params.__dict__, "seed": seed + i}) for i in range(n)]
    return sample(row.expand(n, -1).clone(), ps)


def test_top_k_limits_the_support_to_the_k_best():
    row = random_logits(1, 30, 3)[0]
    assert set(draw(row, SamplingParams(temperature=5.0, top_k=3), 300, 0)) == set(row.topk(3).indices.tolist())


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    row = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    assert set(draw(row, SamplingParams(top_p=0.7), 300, 0)) == {1, 3}  # 0.5 + 0.3 >= 0.7
    assert set(draw(row, SamplingParams(top_p=0.85), 300, 0)) == {1, 2, 3}
    assert set(draw(row, SamplingParams(top_p=0.4), 100, 0)) == {1}


def test_top_k_and_top_p_edge_values_leave_rows_unchanged_or_keep_the_best():
    x = random_logits(3, 20, 4)
    same = apply_top_k_top_p(x, torch.full((3,), 20), torch.ones(3))
    assert torch.equal(same, x)  # k = V, p = 1: bit-for-bit neutral
    tiny = apply_top_k_top_p(x, torch.full((3,), 20), torch.full((3,), 1e-6))
    assert (tiny.isfinite().sum(-1) == 1).all() and torch.equal(tiny.argmax(-1), x.argmax(-1))
    k_big = apply_top_k_top_p(x, torch.full((3,), 10_000).clamp(max=20), torch.ones(3))
    assert torch.equal(k_big, x)


def test_min_p_drops_tokens_below_the_fraction_of_the_best():
    row = torch.tensor([0.5, 0.3, 0.12, 0.08]).log()  # min_p 0.2: keep p >= 0.1 -> {0, 1, 2}
    assert set(draw(row, SamplingParams(min_p=0.2), 400, 0)) == {0, 1, 2}
    assert set(draw(row, SamplingParams(min_p=0.0), 400, 0)) == {0, 1, 2, 3}


def test_temperature_sampling_follows_the_tempered_distribution():
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 4000
    for temperature in (0.5, 2.0):
        tokens = torch.tensor(draw(row, SamplingParams(temperature=temperature), n, 100))
        freq = torch.bincount(tokens, minlength=4).float() / n
        expected = (row / temperature).softmax(-1)
        assert torch.allclose(freq, expected, atol=0.03), (temperature, freq, expected)


def test_noise_is_uniform_and_depends_on_seed_and_step_only():
    seed, step = torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0])
    u = uniform(seed, step, 5000)
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert torch.equal(uniform(torch.tensor([7]), torch.tensor([0]), 5000)[0], u[0])


def test_a_seed_gives_the_same_tokens_whoever_shares_the_batch():
    vocab = 64
    target = random_logits(1, vocab, 7)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=1234)

    def run(batch_size: int, position: int, mates_seed: int) -> list[int]:
        mates = [SamplingParams(temperature=0.7, presence_penalty=0.5, logit_bias={3: 2.0})] * batch_size
        mates[position] = params
        h = Harness(vocab, mates, slots=batch_size + 2)
        mate_logits = random_logits(batch_size, vocab, mates_seed)
        out = []
        for _ in range(12):
            logits = mate_logits.clone()
            logits[position] = target[0]
            out.append(h(logits).tokens[position].item())
        return out

    alone = run(1, 0, 0)
    assert run(5, 3, 11) == alone
    assert run(9, 0, 12) == alone
    assert len(set(alone)) > 1  # really sampling, not a degenerate distribution
    other = Harness(vocab, [SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=99)])
    assert [other(target).tokens.item() for _ in range(12)] != alone


def test_penalties_follow_their_definitions():
    x = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    counts = torch.tensor([[2, 1, 0, 0]], dtype=torch.int32)
    prompt_seen = torch.tensor([[False, False, True, False]])
    out = apply_penalties(x, counts, prompt_seen, torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([2.0]))
    # token 0: seen, positive -> 2/2 = 1, then - 0.25*2 - 0.5 = 0.0; token 1: -1*2 = -2, - 0.25 - 0.5
    # token 2: prompt only -> 0.5/2 (repetition only); token 3: unseen
    assert out.tolist() == [[0.0, -2.75, 0.25, 1.0]]
    neutral = apply_penalties(x, counts, prompt_seen, torch.zeros(1), torch.zeros(1), torch.ones(1))
    assert torch.equal(neutral, x)


def test_frequency_penalty_counts_sampled_tokens_on_the_device():
    """Greedy with a frequency penalty on flat logits cycles through the vocabulary: each sampled token
    is pushed below the others by the device-side counts, no host bookkeeping."""
    h = Harness(4, [SamplingParams(temperature=0, frequency_penalty=1.0)])
    logits = torch.tensor([[0.3, 0.2, 0.1, 0.0]])
    assert [h(logits).tokens.item() for _ in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_repetition_penalty_sees_the_prompt():
    h = Harness(4, [SamplingParams(temperature=0, repetition_penalty=4.0)], prompts=[[0]])
    assert h(torch.tensor([[2.0, 1.0, 0.0, -1.0]])).tokens.item() == 1  # 2/4 = 0.5 < 1


def test_logit_bias_adds_to_the_named_tokens():
    logits = random_logits(2, 10, 5)
    tokens = sample(logits, [SamplingParams(temperature=0, logit_bias={7: 100.0}), SamplingParams(temperature=0)])
    assert tokens == [7, logits[1].argmax().item()]
    banned = sample(logits[:1], [SamplingParams(temperature=0, logit_bias={int(logits[0].argmax()): -100.0})])
    assert banned[0] == logits[0].topk(2).indices[1].item()


def test_min_tokens_holds_back_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 5.0, 1.0]])  # token 1 (EOS here) is the argmax
    h = Harness(3, [SamplingParams(temperature=0, min_tokens=2)], stop_ids=[1])
    assert [h(logits).tokens.item() for _ in range(3)] == [2, 2, 1]


def test_logprobs_are_the_raw_log_softmax_whatever_the_processing():
    logits = random_logits(2, 12, 6)
    h = Harness(12, [SamplingParams(temperature=0, logprobs=3, logit_bias={5: 50.0}),
                     SamplingParams(temperature=0.8, seed=1, logprobs=0)])
    tokens, lps = h(logits).to_host()
    ref = logits.log_softmax(-1)
    assert tokens[0] == 5
    assert math.isclose(lps[0][0], ref[0, 5].item(), rel_tol=1e-6)
    top = ref[0].topk(3)
    assert [i for i, _ in lps[0][1][:3]] == top.indices.tolist()
    assert [v for _, v in lps[0][1][:3]] == pytest.approx(top.values.tolist())
    assert math.isclose(lps[1][0], ref[1, tokens[1]].item(), rel_tol=1e-6)


def test_grammar_mask_allows_only_the_masked_tokens_and_leaves_other_rows():
    vocab = 40
    bitmask = torch.full((2, 2), -1, dtype=torch.int32)
    bitmask[0] = torch.tensor([1 << 3, 0], dtype=torch.int32)  # row 0: only token 3
    allowed = unpack_bitmask(bitmask, vocab)
    assert allowed.shape == (2, vocab) and allowed[0].nonzero().flatten().tolist() == [3] and allowed[1].all()
    logits = random_logits(2, vocab, 8)
    h = Harness(vocab, [SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0)])
    out = h(logits, allowed=allowed).tokens.tolist()
    assert out == [3, logits[1].argmax().item()]


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2},
                                    {"max_tokens": -1}, {"min_p": 1.5}, {"repetition_penalty": 0},
                                    {"logprobs": 21}, {"min_tokens": 5, "max_tokens": 2}])
def test_invalid_sampling_values_are_rejected_with_a_message(kwargs):
    with pytest.raises(RequestRejected, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_stop_accepts_a_single_string_and_drops_empty_ones():
    assert SamplingParams(stop="\n").stop == ["\n"]
    assert SamplingParams(stop=["", "x"]).stop == ["x"]
