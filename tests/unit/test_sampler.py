import itertools
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from lisa_dist.method import LayerSampler


def test_set_is_pure_function_of_seed_and_period_across_processes():
    periods = range(30)
    here = [LayerSampler(12, 3, 5, seed=7).active_layers(p) for p in periods]
    code = (
        "from lisa_dist.method import LayerSampler;"
        "print([LayerSampler(12, 3, 5, seed=7).active_layers(p) for p in range(30)])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(here)
    # Asking in another order, or again, gives the same sets: no hidden iterator state.
    sampler = LayerSampler(12, 3, 5, seed=7)
    assert [sampler.active_layers(p) for p in reversed(periods)] == here[::-1]


def test_sets_are_sorted_distinct_and_of_size_gamma():
    sampler = LayerSampler(10, 4, 1, seed=0)
    for p in range(200):
        layers = sampler.active_layers(p)
        assert list(layers) == sorted(set(layers)) and len(layers) == 4
        assert all(0 <= i < 10 for i in layers)


def test_seed_changes_the_schedule():
    a = [LayerSampler(16, 2, 1, seed=1).active_layers(p) for p in range(20)]
    b = [LayerSampler(16, 2, 1, seed=2).active_layers(p) for p in range(20)]
    assert a != b


def test_global_rng_state_untouched():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    LayerSampler(8, 2, 1, seed=3).active_layers(5)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert (np.random.get_state()[1] == np_state).all()


def test_uniform_is_uniform_over_layers_and_over_sets():
    num_layers, gamma, periods = 8, 2, 4000
    sampler = LayerSampler(num_layers, gamma, 1, seed=123)
    sets = [sampler.active_layers(p) for p in range(periods)]
    per_layer = Counter(i for s in sets for i in s)
    _, p_layers = chisquare([per_layer[i] for i in range(num_layers)])
    per_set = Counter(sets)
    all_sets = list(itertools.combinations(range(num_layers), gamma))
    _, p_sets = chisquare([per_set[s] for s in all_sets])
    assert p_layers > 1e-3 and p_sets > 1e-3
    # The test has power: a sampler that never picks layer 0 fails it.
    biased = [per_layer[i] if i else 0 for i in range(num_layers)]
    assert chisquare(biased, [periods * gamma / num_layers] * num_layers, sum_check=False).pvalue < 1e-6


def test_weighted_follows_its_probabilities():
    weights = [1.0, 2.0, 3.0, 4.0, 0.0, 10.0]
    sampler = LayerSampler(6, 1, 1, seed=9, strategy="weighted", weights=weights)
    counts = Counter(sampler.active_layers(p)[0] for p in range(6000))
    assert counts[4] == 0
    observed = [counts[i] for i in range(6) if weights[i] > 0]
    expected = [6000 * w / sum(weights) for w in weights if w > 0]
    assert chisquare(observed, expected).pvalue > 1e-3
    pairs = LayerSampler(6, 2, 1, seed=9, strategy="weighted", weights=weights)
    assert all(4 not in pairs.active_layers(p) for p in range(500))


def test_fixed_strategy():
    sampler = LayerSampler(6, 2, 3, seed=0, strategy="fixed", fixed_layers=[4, 1])
    assert {sampler.active_layers(p) for p in range(10)} == {(1, 4)}


def test_period_of_step():
    sampler = LayerSampler(6, 2, 5, seed=0)
    assert [sampler.period_of(s) for s in (0, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 0}, "gamma"),
        ({"gamma": 7}, "gamma"),
        ({"interval": 0}, "interval"),
        ({"strategy": "greedy"}, "strategy"),
        ({"strategy": "weighted", "weights": [1.0]}, "weights"),
        ({"strategy": "fixed", "fixed_layers": [1]}, "fixed_layers"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"num_layers": 6, "gamma": 2, "interval": 1, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        LayerSampler(**args)


def test_grad_norm_importance_weights():
    from lisa_dist.method import GradNormImportance

    imp = GradNormImportance(4, floor=0.2, decay=0.5)
    assert imp.weights() == [0.25] * 4  # nothing seen: uniform
    imp.observe([0, 1], [1.0, 3.0])
    weights = imp.weights()
    # unseen layers count as the largest seen (3.0): scores 1, 3, 3, 3 out of 10, plus the floor 0.2 / 4
    assert weights == pytest.approx([0.05 + 0.8 * 0.1, 0.05 + 0.8 * 0.3, 0.05 + 0.8 * 0.3, 0.05 + 0.8 * 0.3])
    assert sum(weights) == pytest.approx(1.0)
    imp.observe([0], [3.0])  # running mean: 0.5 * 1 + 0.5 * 3
    assert imp.norms[0] == 2.0
    imp.observe([1], [float("nan")])  # an overflowing step is ignored
    assert imp.norms[1] == 3.0
    saved = imp.state_dict()
    other = GradNormImportance(4, floor=0.2, decay=0.5)
    other.load_state_dict(saved)
    assert other.weights() == imp.weights()
    with pytest.raises(ValueError, match="has 4 layers, the model 5"):
        GradNormImportance(5, 0.2, 0.5).load_state_dict(saved)


def test_grad_norm_sampling_follows_the_weights_and_keeps_a_floor():
    sampler = LayerSampler(4, 1, 1, seed=0, strategy="grad_norm")
    weights = [0.7, 0.1, 0.1, 0.1]
    counts = Counter(sampler.active_layers(p, weights)[0] for p in range(4000))
    assert chisquare([counts[i] for i in range(4)], [4000 * w for w in weights]).pvalue > 1e-3
    assert sampler.active_layers(7, weights) == sampler.active_layers(7, weights)  # pure in (seed, period, weights)
    with pytest.raises(ValueError, match=r"lisa.weights"):
        sampler.active_layers(0, None)


def test_grad_norm_training_visits_every_layer_and_prefers_larger_gradients(tmp_path):
    from lisa_dist.config import load_config
    from lisa_dist.run import build, train_step

    from ..helpers import tiny_overrides, write_text_data

    data = write_text_data(tmp_path / "text.jsonl")
    cfg = load_config(
        None, tiny_overrides(tmp_path, data, "--lisa.strategy=grad_norm", "--lisa.interval=1", "--train.steps=12")
    )
    run = build(cfg)
    for step in range(12):
        train_step(run, step)
    assert run.layers_visited == {0, 1, 2, 3}
    assert all(n is not None and n > 0 for n in run.importance.norms)
    weights = run.importance.weights()
    order = sorted(range(4), key=lambda i: run.importance.norms[i])
    assert [weights[i] for i in order] == sorted(weights)  # more probability for a larger gradient norm
    assert min(weights) >= cfg.lisa.importance_floor / 4
