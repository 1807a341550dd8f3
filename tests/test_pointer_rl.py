"""The attention model and its label-free training (chapter 1, Kool et al. 2019; POMO,
Kwon et al. 2020): set equivariance, valid tours in every decoding mode, the REINFORCE
estimator against the exact gradient on an enumerable problem, and the committed TSP20
checkpoint against LKH and Held-Karp."""
import itertools
import math

import pytest
import torch

from refimpl.pointer import (SYMMETRIES, AttentionConfig, AttentionModel, PointerConfig,
                             PointerNet, augment, beam_tours, best_tours, check_tour,
                             closed_length, encode_cities, evaluate, held_karp, load, pomo_loss, record_of,
                             reinforce_loss, rollout, solve, tour_log_prob, tour_length,
                             tsp_instances)
from refimpl.pointer.lkh import lkh_lengths
from refimpl.pointer.reinforce import RLConfig, paired_better, train_rl


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return AttentionModel(AttentionConfig(dim=32, layers=2, heads=4, ff=64, **kw)).eval()


def random_points(B, n, seed=0):
    return torch.rand(B, n, 2, generator=torch.Generator().manual_seed(seed))


def all_tours(n, start=0):
    """Every tour from ``start``: [1, (n-1)!, n]."""
    rest = [c for c in range(n) if c != start]
    return torch.tensor([[start, *p] for p in itertools.permutations(rest)])[None]


def test_encoder_is_permutation_equivariant():
    """In float64: in float32 the relabelled sums round differently (1.6e-5 apart on some CPUs)."""
    model, x = small_model().double(), random_points(3, 9).double()
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = encode_cities(model, x).nodes
        h_perm = encode_cities(model, x[:, perm]).nodes
    torch.testing.assert_close(h_perm, h[:, perm], rtol=1e-10, atol=1e-10)


def test_multi_start_tours_are_equivariant_too():
    """Relabel the cities: the greedy tour from each start is the same tour, relabelled."""
    model, x = small_model(), random_points(2, 8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))  # new slot -> old city
    with torch.no_grad():
        tours, _ = rollout(model, x, 8)
        tours_p, _ = rollout(model, x[:, perm], perm.expand(2, -1).argsort(1))
    assert torch.equal(perm[tours_p], tours)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_decoder_never_revisits_a_city(mode):
    model, x = small_model(), random_points(4, 11)
    with torch.no_grad():
        if mode == "beam":
            tours = beam_tours(model, x, 5, torch.tensor([0, 3, 7, 10]))[:, None]
        else:
            g = torch.Generator().manual_seed(0)
            tours, _ = rollout(model, x, 11, sample=mode == "sample", generator=g)
    check_tour(tours.flatten(0, 1))  # raises unless every row is a permutation
    for row in solve(model, x, beam_size=3, starts=2, symmetries=8):
        check_tour(row[None])


def test_tour_probabilities_sum_to_one_over_all_tours():
    model, x = small_model(), random_points(1, 5)
    with torch.no_grad():
        logp = tour_log_prob(model, x, all_tours(5))
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_rollout_log_probs_equal_teacher_forcing():
    model, x = small_model(), random_points(3, 7)
    with torch.no_grad():
        tours, logp = rollout(model, x, 7, sample=True, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(tour_log_prob(model, x, tours), logp, rtol=1e-5, atol=1e-5)


def test_wide_beam_finds_the_most_likely_tour_and_width_one_is_greedy():
    """Brute force over all 4! tours from city 0 at n = 5: a beam of 24 keeps every partial
    tour, so it must return the argmax; a beam of 1 is greedy decoding."""
    model, x = small_model(3), random_points(6, 5, seed=3)
    first = torch.zeros(6, dtype=torch.long)
    with torch.no_grad():
        tours = all_tours(5).expand(6, -1, -1)
        best = tours[torch.arange(6), tour_log_prob(model, x, tours).argmax(1)]
        assert torch.equal(beam_tours(model, x, 24, first), best)
        assert torch.equal(beam_tours(model, x, 1, first), rollout(model, x, 1)[0][:, 0])


def test_the_eight_symmetries_keep_every_tour_length():
    x = random_points(2, 9)
    views = augment(x)
    assert views.shape == (SYMMETRIES, 2, 9, 2)
    assert len({tuple(v.flatten().tolist()) for v in views}) == SYMMETRIES
    tours = torch.randperm(9).expand(2, 1, -1)
    lengths = torch.stack([closed_length(v, tours) for v in views])
    torch.testing.assert_close(lengths, lengths[:1].expand_as(lengths))
    torch.testing.assert_close(lengths[0, :, 0], tour_length(x, tours[:, 0]))


def gradient(loss, model):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def exact_gradient(model, x):
    """grad of E[L] = sum over the 6 tours from city 0 at n = 4 of p(tour) L(tour)."""
    tours = all_tours(4)
    return gradient((tour_log_prob(model, x, tours).exp() * closed_length(x, tours)).sum(), model)


def estimates(model, x, baseline, repeats=40, samples=500, seed=0):
    """``repeats`` independent REINFORCE estimates, each from ``samples`` sampled tours."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(repeats):
        tours, logp = rollout(model, x, torch.zeros(1, samples, dtype=torch.long), sample=True,
                              generator=g)
        lengths = closed_length(x, tours)
        out.append(gradient(reinforce_loss(lengths, logp, baseline(lengths)), model))
    return torch.stack(out)


def z_scores(est, exact):
    """z of the mean estimate against the exact gradient, along 8 fixed random directions."""
    dirs = torch.randn(exact.numel(), 8, generator=torch.Generator().manual_seed(5))
    proj, target = est @ dirs, exact @ dirs
    return (proj.mean(0) - target) / (proj.std(0) / math.sqrt(len(est)))


def test_reinforce_is_unbiased_on_an_enumerable_problem():
    """n = 4 has 6 tours from city 0: the exact gradient of the expected length is a sum.
    The estimator with a constant baseline (or none) matches it within 4.5 standard errors in
    every direction; a baseline that depends on the sampled tour's own length does not
    (negative control: b = L / 2 halves the gradient)."""
    model, x = small_model(4), random_points(1, 4, seed=4)
    model.train()
    exact = exact_gradient(model, x)
    for baseline in (lambda L: torch.zeros(()), lambda L: torch.full((), 2.0)):
        assert z_scores(estimates(model, x, baseline), exact).abs().max() < 4.5
    biased = z_scores(estimates(model, x, lambda L: L / 2), exact)
    assert biased.abs().max() > 10


def test_pomo_with_one_start_is_reinforce_with_the_mean_baseline():
    """P tours from the same start: POMO's loss is REINFORCE with their mean length as the
    baseline (same gradient, exactly), and its expectation is (1 - 1/P) times the true
    gradient, because the mean includes the tour's own length."""
    model, x = small_model(4), random_points(1, 4, seed=4)
    model.train()
    P, one_start = 2, torch.zeros(1, 2, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    tours, logp = rollout(model, x, one_start, sample=True, generator=g)
    lengths = closed_length(x, tours)
    a = gradient(pomo_loss(lengths, logp), model)
    b = gradient(reinforce_loss(lengths, tour_log_prob(model, x, tours), lengths.mean()), model)
    torch.testing.assert_close(a, b)
    exact = exact_gradient(model, x)
    est = []
    for _ in range(400):
        tours, logp = rollout(model, x, one_start, sample=True, generator=g)
        est.append(gradient(pomo_loss(closed_length(x, tours), logp), model))
    est = torch.stack(est)
    assert z_scores(est, (1 - 1 / P) * exact).abs().max() < 4.5
    assert z_scores(est, exact).abs().max() > 4.5  # without the factor: biased


def test_lkh_reference_is_optimal_at_small_n():
    x = random_points(6, 10, seed=6)
    torch.testing.assert_close(lkh_lengths(x), held_karp(x)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 5), "points"), (torch.rand(2, 2, 2), "points"), (torch.rand(2, 5, 3), "points"),
    (torch.full((1, 5, 2), math.nan), "points")])
def test_bad_points_raise_naming_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        solve(small_model(), bad)
    with pytest.raises(ValueError, match=match):
        rollout(small_model(), bad, 1)


def test_bad_starts_and_options_raise():
    model, x = small_model(), random_points(2, 5)
    with pytest.raises(ValueError, match="starts"):
        solve(model, x, starts=6)
    with pytest.raises(ValueError, match="starts"):
        rollout(model, x, torch.tensor([[0], [5]]))
    with pytest.raises(ValueError, match="symmetries"):
        solve(model, x, symmetries=4)
    with pytest.raises(ValueError, match="beam_size"):
        solve(model, x, beam_size=0)
    with pytest.raises(ValueError, match="attention model only"):
        solve(PointerNet(PointerConfig()), x, starts=2)
    with pytest.raises(ValueError, match="config.dim"):
        AttentionModel(AttentionConfig(dim=30, heads=4))


def test_committed_tsp20_checkpoint_meets_its_targets():
    """The 200 test instances of the committed record, decoded again here and scored against
    LKH (exact at n = 20 on these, checked below on the record's Held-Karp mean): greedy from
    all 20 starts within 1.0% of optimal, with the x8 augmentation within 0.3%."""
    model = load("tsp", 20)
    assert isinstance(model, AttentionModel)
    record = record_of("tsp", 20)
    x = tsp_instances(20, 200)
    optimal = lkh_lengths(x)
    held_karp_mean = {r["mean_optimal"] for r in record["test"] if r["reference"] == "held_karp"}
    assert held_karp_mean and float(optimal.mean()) == pytest.approx(held_karp_mean.pop(), rel=1e-6)
    greedy = evaluate("tsp", model, 20, 200, optimal=optimal)
    augmented = evaluate("tsp", model, 20, 200, optimal=optimal, symmetries=SYMMETRIES)
    assert greedy["valid"] == augmented["valid"] == 1.0
    assert greedy["gap"] <= 0.010 and augmented["gap"] <= 0.003
    tours, lengths = best_tours(model, x[:4], 20)
    torch.testing.assert_close(lengths, tour_length(x[:4], tours))


def test_paired_t_test_of_the_rollout_baseline():
    """Kool et al.'s baseline update: replace only when the new model is significantly shorter."""
    g = torch.Generator().manual_seed(0)
    old = 4 + torch.rand(200, generator=g)
    noise = 0.05 * torch.randn(200, generator=g)
    assert paired_better(old - 0.02 + noise, old)  # 0.02 shorter, standard error 0.0035
    assert not paired_better(old + noise - noise.mean(), old)  # no difference on average
    assert not paired_better(old + 0.02 + noise, old)  # longer


@pytest.mark.parametrize("method", ["pomo", "rollout"])
def test_a_few_training_steps_lower_the_sampled_length(method):
    """Both training methods run end to end on tiny settings, and 40 steps of either shorten the
    greedy tours at n = 8 against the same model before training."""
    cfg = RLConfig(n=8, method=method, steps=40, batch_size=16, lr=1e-3, min_lr=1e-3, dim=32,
                   layers=1, heads=4, ff=64, eval_every=20, eval_instances=20, baseline_every=20)
    model, record = train_rl(cfg, progress=False)
    curve = [h["sampled_length"] for h in record["history"]]
    assert len(curve) == 2 and record["history"][-1]["step"] == 40
    torch.manual_seed(cfg.seed)  # train_rl's initialisation, before training
    untrained = AttentionModel(AttentionConfig(dim=32, layers=1, heads=4, ff=64)).eval()
    x = random_points(64, 8, seed=9)
    with torch.no_grad():
        before = closed_length(x, rollout(untrained, x, 1)[0]).mean()
        after = closed_length(x, rollout(model, x, 1)[0]).mean()
    assert after < before


def test_bad_training_config_raises():
    with pytest.raises(ValueError, match="method"):
        train_rl(RLConfig(method="ppo"), progress=False)
    with pytest.raises(ValueError, match="n"):
        train_rl(RLConfig(n=2), progress=False)
