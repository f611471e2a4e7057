"""Sampler unit tests on hand-made logits, and SamplingParams validation."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch

from radixfair.engine.sampler import Sampler
from radixfair.sampling_params import SamplingParams
from radixfair.sched.request import Req

CPU = torch.device("cpu")
N_DRAWS = 3000


def mkreq(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: tuple[int, ...] = (),
    rid: str | None = None,
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    **sp: Any,
) -> Req:
    kw: dict[str, Any] = {} if rid is None else {"rid": rid}
    r = Req(
        origin_input_ids=list(prompt or [1]),
        sampling_params=SamplingParams(**sp),
        eos_token_ids=eos,
        return_logprob=return_logprob,
        top_logprobs_num=top_logprobs_num,
        **kw,
    )
    r.output_ids = list(output or [])
    return r


def draws(probs: list[float], n: int = N_DRAWS, **sp: Any) -> Counter[int]:
    """Sample `n` times from one distribution (as a batch of `n` identical rows)."""
    torch.manual_seed(0)  # deterministic draws: no flaky statistics
    logits = torch.tensor(probs, dtype=torch.float32).log().expand(n, -1).contiguous()
    reqs = [mkreq(**sp) for _ in range(n)]
    return Counter(Sampler(CPU).sample(logits, reqs).token_ids)


# ---- greedy -----------------------------------------------------------------------------------


def test_temperature_zero_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 50)
    reqs = [mkreq(temperature=0.0) for _ in range(16)]
    assert Sampler(CPU).sample(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_top_k_one_is_argmax_at_any_temperature() -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 50)
    reqs = [mkreq(temperature=1.5, top_k=1) for _ in range(16)]
    assert Sampler(CPU).sample(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_mixed_batch_each_row_keeps_its_own_parameters() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 40) * 3
    reqs = [mkreq(temperature=0.0), mkreq(temperature=1.0, top_k=2), mkreq(temperature=0.7, top_k=1)]
    top2 = set(logits[1].topk(2).indices.tolist())
    for _ in range(50):
        got = Sampler(CPU).sample(logits, reqs).token_ids
        assert got[0] == int(logits[0].argmax())
        assert got[1] in top2
        assert got[2] == int(logits[2].argmax())


def test_logits_are_not_modified_in_place() -> None:
    logits = torch.randn(2, 30)
    before = logits.clone()
    reqs = [
        mkreq(output=[3, 3, 4], temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, frequency_penalty=1.0,
              repetition_penalty=1.3, min_new_tokens=5, stop_token_ids=[0], max_new_tokens=9),
        mkreq(temperature=0.0),
    ]
    Sampler(CPU).sample(logits, reqs)
    assert torch.equal(logits, before)


# ---- truncation ---------------------------------------------------------------------------------


def test_top_k_only_samples_among_the_top_k() -> None:
    probs = [0.05, 0.3, 0.02, 0.25, 0.08, 0.2, 0.1]
    got = draws(probs, temperature=1.0, top_k=3)
    assert set(got) == {1, 3, 5}, got


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    got = draws([0.5, 0.3, 0.15, 0.05], temperature=1.0, top_p=0.75)
    assert set(got) == {0, 1}, got
    # renormalised over the kept set: 0.5 / 0.8 = 0.625
    assert abs(got[0] / N_DRAWS - 0.625) < 0.05


def test_top_p_always_keeps_the_most_likely_token() -> None:
    got = draws([0.1, 0.7, 0.2], n=200, temperature=1.0, top_p=0.05)
    assert set(got) == {1}


def test_top_p_works_on_unsorted_vocabularies() -> None:
    got = draws([0.05, 0.15, 0.5, 0.3], temperature=1.0, top_p=0.75)
    assert set(got) == {2, 3}, got


def test_min_p_drops_tokens_below_the_scaled_maximum() -> None:
    # cutoff 0.2 * 0.5 = 0.1: 0.15 stays, 0.05 goes
    got = draws([0.5, 0.3, 0.15, 0.05], temperature=1.0, min_p=0.2)
    assert set(got) == {0, 1, 2}, got


def test_top_k_and_top_p_combine() -> None:
    # top_k=3 leaves {0.4, 0.3, 0.2} (renormalised 4/9, 3/9, 2/9); top_p=0.6 keeps the first two
    got = draws([0.4, 0.3, 0.2, 0.1], temperature=1.0, top_k=3, top_p=0.6)
    assert set(got) == {0, 1}, got


def test_temperature_scales_the_distribution() -> None:
    logits = [0.0, 1.0]
    for temp in (0.5, 2.0):
        p1 = 1 / (1 + math.exp(-1.0 / temp))
        got = draws([math.exp(x) for x in logits], temperature=temp)
        assert abs(got[1] / N_DRAWS - p1) < 0.04, (temp, got)


def test_full_distribution_when_nothing_truncates() -> None:
    got = draws([0.25, 0.25, 0.25, 0.25], temperature=1.0)
    assert set(got) == {0, 1, 2, 3}
    assert all(abs(c / N_DRAWS - 0.25) < 0.04 for c in got.values())


def test_top_k_larger_than_the_vocabulary_means_the_whole_vocabulary() -> None:
    got = draws([0.25, 0.25, 0.25, 0.25], n=400, temperature=1.0, top_k=50)
    assert set(got) == {0, 1, 2, 3}


def test_tiny_positive_temperature_behaves_as_greedy() -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 20) * 5
    reqs = [mkreq(temperature=1e-38) for _ in range(4)]
    assert Sampler(CPU).sample(logits, reqs).token_ids == logits.argmax(-1).tolist()


# ---- seeds ------------------------------------------------------------------------------------


def seeded_sequence(sampler: Sampler, seed: int, rid: str, steps: int = 30, others: int = 0) -> list[int]:
    torch.manual_seed(123)  # the global RNG must not matter for seeded requests
    logits = torch.zeros(1 + others, 64)
    r = mkreq(rid=rid, temperature=1.0, seed=seed)
    reqs = [r] + [mkreq(temperature=1.0) for _ in range(others)]
    out = []
    for _ in range(steps):
        torch.rand(7)  # perturb the global generator between steps
        out.append(sampler.sample(logits, reqs).token_ids[0])
    return out


def test_same_seed_gives_the_same_sequence_across_samplers() -> None:
    a = seeded_sequence(Sampler(CPU), 42, "a")
    b = seeded_sequence(Sampler(CPU), 42, "b")
    assert a == b
    assert len(set(a)) > 5, "a uniform distribution over 64 tokens should not repeat much"


def test_different_seeds_give_different_sequences() -> None:
    assert seeded_sequence(Sampler(CPU), 1, "a") != seeded_sequence(Sampler(CPU), 2, "b")


def test_seeded_sequence_does_not_depend_on_the_batch() -> None:
    alone = seeded_sequence(Sampler(CPU), 7, "x")
    batched = seeded_sequence(Sampler(CPU), 7, "y", others=5)
    assert alone == batched


def test_forget_restarts_a_seeded_request() -> None:
    sampler = Sampler(CPU)
    first = seeded_sequence(sampler, 9, "r", steps=10)
    sampler.forget("r")
    assert seeded_sequence(sampler, 9, "r", steps=10) == first


def test_unseeded_requests_vary() -> None:
    torch.manual_seed(0)
    logits = torch.zeros(1, 64)
    r = mkreq(temperature=1.0)
    seq = [Sampler(CPU).sample(logits, [r]).token_ids[0] for _ in range(30)]
    assert len(set(seq)) > 5


# ---- penalties --------------------------------------------------------------------------------


def penalised(logits: torch.Tensor, r: Req) -> torch.Tensor:
    return Sampler(CPU)._apply_penalties(logits.clone().unsqueeze(0), [r])[0]


def test_frequency_and_presence_penalties_follow_openai() -> None:
    torch.manual_seed(4)
    logits = torch.randn(20)
    r = mkreq(prompt=[9, 9, 11], output=[5, 5, 5, 7], frequency_penalty=0.5, presence_penalty=0.25)
    want = logits.clone()
    want[5] -= 0.5 * 3 + 0.25
    want[7] -= 0.5 * 1 + 0.25
    # prompt tokens are not penalised
    torch.testing.assert_close(penalised(logits, r), want)


def test_negative_frequency_penalty_encourages_repeats() -> None:
    logits = torch.zeros(10)
    r = mkreq(output=[3, 3], frequency_penalty=-1.0)
    got = penalised(logits, r)
    assert got[3].item() == pytest.approx(2.0)
    assert got.argmax().item() == 3


def test_no_output_means_no_frequency_penalty() -> None:
    logits = torch.randn(10)
    r = mkreq(prompt=[1, 2, 3], frequency_penalty=2.0, presence_penalty=2.0)
    torch.testing.assert_close(penalised(logits, r), logits)


def test_repetition_penalty_follows_hf_on_prompt_and_output() -> None:
    logits = torch.tensor([1.0, 2.0, -1.0, 3.0, -2.0, 0.5, 4.0, -3.0])
    r = mkreq(prompt=[1, 2], output=[3, 4], repetition_penalty=2.0)
    want = logits.clone()
    want[1] = 2.0 / 2  # positive: divided
    want[2] = -1.0 * 2  # negative: multiplied
    want[3] = 3.0 / 2
    want[4] = -2.0 * 2
    torch.testing.assert_close(penalised(logits, r), want)


def test_repetition_penalty_below_one_encourages_repeats() -> None:
    logits = torch.tensor([1.0, 2.0, -1.0])
    r = mkreq(prompt=[0, 2], repetition_penalty=0.5)
    torch.testing.assert_close(penalised(logits, r), torch.tensor([2.0, 2.0, -0.5]))


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.5, 1.0]])
    plain = Sampler(CPU).sample(logits, [mkreq(output=[1], temperature=0.0)]).token_ids
    pen = Sampler(CPU).sample(logits, [mkreq(output=[1], temperature=0.0, presence_penalty=1.0)]).token_ids
    rep = Sampler(CPU).sample(logits, [mkreq(prompt=[1], temperature=0.0, repetition_penalty=1.2)]).token_ids
    assert plain == [1] and pen == [2] and rep == [2]


# ---- min_new_tokens ---------------------------------------------------------------------------


def test_min_new_tokens_bans_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 3.0, 8.0]])  # eos 2 best, stop token 4 next
    kw: dict[str, Any] = dict(eos=(2,), temperature=0.0, min_new_tokens=3, max_new_tokens=10, stop_token_ids=[4])
    assert Sampler(CPU).sample(logits, [mkreq(output=[0], **kw)]).token_ids == [3]
    assert Sampler(CPU).sample(logits, [mkreq(output=[0, 0], **kw)]).token_ids == [3]
    # reached: eos allowed again
    assert Sampler(CPU).sample(logits, [mkreq(output=[0, 0, 0], **kw)]).token_ids == [2]


def test_min_new_tokens_with_ignore_eos_only_bans_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 3.0, 8.0]])
    r = mkreq(output=[0], eos=(2,), temperature=0.0, min_new_tokens=3, max_new_tokens=10, stop_token_ids=[4],
              ignore_eos=True)
    assert Sampler(CPU).sample(logits, [r]).token_ids == [2]
    r2 = mkreq(output=[0], eos=(2,), temperature=0.0, min_new_tokens=3, max_new_tokens=10, stop_token_ids=[2])
    assert Sampler(CPU).sample(logits, [r2]).token_ids == [4]


def test_min_new_tokens_bans_when_sampling_too() -> None:
    probs = [0.45, 0.45, 0.1]
    got = draws(probs, n=500, eos=(0,), temperature=1.0, min_new_tokens=2, max_new_tokens=5, stop_token_ids=[1])
    assert set(got) == {2}


# ---- logprobs ---------------------------------------------------------------------------------


def test_logprobs_and_top_logprobs() -> None:
    torch.manual_seed(5)
    logits = torch.randn(3, 30) * 2
    reqs = [
        mkreq(temperature=0.0, return_logprob=True, top_logprobs_num=4),
        mkreq(temperature=1.0, return_logprob=True, top_logprobs_num=2),
        mkreq(temperature=0.0),
    ]
    res = Sampler(CPU).sample(logits, reqs)
    ref = torch.log_softmax(logits, dim=-1)
    assert res.logprobs is not None and res.top_logprobs is not None
    for i, tok in enumerate(res.token_ids):
        assert res.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-5)
    assert len(res.top_logprobs[0]) == 4 and len(res.top_logprobs[1]) == 2
    for i in (0, 1):
        top = res.top_logprobs[i]
        vals = [v for v, _ in top]
        assert vals == sorted(vals, reverse=True)
        want = ref[i].topk(len(top))
        assert [t for _, t in top] == want.indices.tolist()
        assert vals == pytest.approx(want.values.tolist(), abs=1e-5)
    assert res.top_logprobs[0][0][1] == res.token_ids[0], "greedy token comes first"
    assert res.top_logprobs[2] == []


def test_logprobs_are_of_the_model_distribution_not_the_penalised_one() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.5, 1.0]])
    r = mkreq(output=[1], temperature=0.0, presence_penalty=1.0, return_logprob=True, top_logprobs_num=1)
    res = Sampler(CPU).sample(logits, [r])
    assert res.token_ids == [2]
    ref = torch.log_softmax(logits[0], -1)
    assert res.logprobs == pytest.approx([ref[2].item()], abs=1e-6)
    assert res.top_logprobs is not None and res.top_logprobs[0][0][1] == 1


def test_no_logprobs_unless_asked() -> None:
    res = Sampler(CPU).sample(torch.randn(2, 10), [mkreq(temperature=0.0), mkreq(temperature=0.0)])
    assert res.logprobs is None and res.top_logprobs is None


# ---- SamplingParams ---------------------------------------------------------------------------


def test_defaults_and_from_dict() -> None:
    assert SamplingParams.from_dict(None) == SamplingParams()
    sp = SamplingParams.from_dict({"max_new_tokens": 5, "stop": "###", "top_k": None, "temperature": 0})
    assert sp.max_new_tokens == 5 and sp.stop == ("###",) and sp.top_k == -1 and sp.greedy
    assert SamplingParams(top_k=1).greedy and not SamplingParams().greedy
    assert SamplingParams.from_dict(sp.to_dict()) == sp
    assert SamplingParams(presence_penalty=0.1).has_penalties and not SamplingParams().has_penalties


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams.from_dict({"max_tokens": 5})
    with pytest.raises(ValueError, match="sampling_params must be an object"):
        SamplingParams.from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", -1),
        ("max_new_tokens", 1.5),
        ("max_new_tokens", True),
        ("max_new_tokens", "8"),
        ("max_new_tokens", 1 << 30),
        ("min_new_tokens", -1),
        ("min_new_tokens", 200),  # > max_new_tokens (128)
        ("temperature", -0.1),
        ("temperature", "hot"),
        ("top_p", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", 0),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -3),
        ("presence_penalty", 2.1),
        ("repetition_penalty", 0),
        ("repetition_penalty", 2.5),
        ("stop", [""]),
        ("stop", [1]),
        ("stop", ""),
        ("stop", [f"s{i}" for i in range(17)]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["a"]),
        ("stop_token_ids", 5),
        ("ignore_eos", "yes"),
        ("seed", 1.5),
        ("skip_special_tokens", "no"),
        ("spaces_between_special_tokens", False),
        ("n", 0),
        ("n", 129),
    ],
)
def test_invalid_values_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict({field: value})


def test_sampling_params_are_immutable() -> None:
    sp = SamplingParams(max_new_tokens=8, stop=["x"])
    with pytest.raises(AttributeError):
        sp.max_new_tokens = 4  # type: ignore[misc]
    clipped = sp.replace(max_new_tokens=4)
    assert (sp.max_new_tokens, clipped.max_new_tokens, clipped.stop) == (8, 4, ("x",))


def test_boundary_values_are_accepted() -> None:
    SamplingParams.from_dict({"max_new_tokens": 0, "top_p": 1, "top_k": -1, "min_p": 1, "temperature": 0,
                              "frequency_penalty": -2, "presence_penalty": 2, "repetition_penalty": 2,
                              "seed": 0, "stop_token_ids": [0], "n": 128})


def test_sglang_frontend_null_and_empty_fields_are_accepted() -> None:
    """sglang.RuntimeEndpoint sends every field it knows; unset ones arrive as null or []."""
    from radixfair.sampling_params import SamplingParams

    sp = SamplingParams.from_dict(
        {"max_new_tokens": 4, "regex": None, "json_schema": None, "stop_regex": [], "stop": None}
    )
    assert sp.max_new_tokens == 4 and sp.stop == ()
    with pytest.raises(ValueError, match="stop_regex"):
        SamplingParams.from_dict({"stop_regex": ["x+"]})


def test_categorical_inverse_cdf_draws() -> None:
    """The sampler's draw: the row's distribution (unnormalized is fine), never a zero-probability
    token, and the two ends of u land on the first and last tokens that can be drawn."""
    from radixfair.engine.sampler import categorical

    probs = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0]])  # -> 0.5, 0.25, 0.25 at 1, 3, 4
    u = torch.tensor([0.0, 0.4999, 0.5001, 0.7499, 0.7501, 1.0 - 1e-7])
    assert categorical(probs.expand(6, -1), u).tolist() == [1, 1, 3, 3, 4, 4]
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    got = Counter(categorical(probs.expand(n, -1), torch.rand(n, generator=gen)).tolist())
    assert set(got) == {1, 3, 4}
    for tok, p in ((1, 0.5), (3, 0.25), (4, 0.25)):
        assert abs(got[tok] / n - p) < 0.01  # ~4.5 standard deviations


def test_row_by_row_retry_keeps_each_rows_grammar_mask() -> None:
    """When a batched draw fails and the rows are sampled one at a time, a constrained row still gets
    its own mask (and only its own)."""
    from radixfair.engine.constrained.mask import TokenMask
    from radixfair.engine.isolation import sample_isolated

    sampler = Sampler(CPU)
    real = sampler.sample
    calls: list[int] = []

    def flaky(logits: torch.Tensor, reqs: list[Req], mask: TokenMask | None = None) -> Any:
        calls.append(len(reqs))
        if len(reqs) > 1:
            raise RuntimeError("the batched draw fails")
        return real(logits, reqs, mask)

    sampler.sample = flaky  # type: ignore[method-assign]
    logits = torch.zeros(3, 10)
    logits[:, 7] = 50.0  # every row's argmax is 7
    allowed = torch.zeros(1, 10, dtype=torch.bool)
    allowed[0, 5] = True
    mask = TokenMask(torch.tensor([1]), allowed)  # only row 1 is constrained: token 5
    res, failed = sample_isolated(sampler, logits, [mkreq(temperature=0.0) for _ in range(3)], mask)
    assert calls == [3, 1, 1, 1] and failed == {}
    assert res.token_ids == [7, 5, 7]
