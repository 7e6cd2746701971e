"""The sampler against direct numpy computations of what each option must do."""

import numpy as np
import pytest

from relaxlm.runtime.sampling import Sampler, SamplingParams, chat_sampling

LOGITS = np.array([1.0, 3.0, 2.0, -1.0, 0.5], dtype=np.float32)


def test_greedy_takes_the_argmax():
    assert Sampler(SamplingParams()).__call__(LOGITS) == 1


def test_top_k_one_is_greedy_at_any_temperature():
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=0))
    assert {sampler(LOGITS) for _ in range(50)} == {1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.exp(LOGITS - LOGITS.max())
    probs /= probs.sum()
    # Tokens 1 and 2 hold ~0.86 of the mass: p = 0.8 keeps exactly them.
    assert probs[1] < 0.8 < probs[1] + probs[2]
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0))
    assert {sampler(LOGITS) for _ in range(200)} == {1, 2}


def test_same_seed_same_samples():
    first = Sampler(SamplingParams(temperature=1.0, seed=7))
    second = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert [first(LOGITS) for _ in range(20)] == [second(LOGITS) for _ in range(20)]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    penalised = Sampler(SamplingParams(repetition_penalty=2.0)).penalise(LOGITS, [1, 3])
    np.testing.assert_allclose(penalised, [1.0, 1.5, 2.0, -2.0, 0.5])


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_chat_samples_with_the_models_generation_config_else_ollamas_defaults():
    assert chat_sampling({}) == SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1,
                                               repetition_window=64)
    model = chat_sampling({"do_sample": True, "temperature": 0.6, "top_p": 0.95})
    assert (model.temperature, model.top_p, model.top_k) == (0.6, 0.95, 40)
    assert chat_sampling({"do_sample": False, "temperature": 0.6}).temperature == 0.0
    assert chat_sampling({"temperature": 0.6}, temperature=0.2, top_k=None).temperature == 0.2


def test_the_repetition_window_penalises_only_recent_tokens():
    sampler = Sampler(SamplingParams(repetition_penalty=2.0, repetition_window=1))
    np.testing.assert_allclose(sampler.penalise(LOGITS, [1, 3]), [1.0, 3.0, 2.0, -2.0, 0.5])


def test_an_invalid_value_names_its_parameter():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
