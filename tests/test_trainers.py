"""The MAP clients' optimizer: torch's fused Adam gives the single-tensor Adam's trajectory to float tolerance; the
Laplace clients' diagonal GGN, per layer, by Jacobians and by one sampled label, against its definition."""

import pytest
import torch

from fedvb.core.trainers import _linear_layers, make_optimizer
from fedvb.models import build_model


def test_fused_adam_follows_the_single_tensor_adam():
    torch.manual_seed(0)
    fused = build_model("mlp", (1, 28, 28), 10, hidden=[200, 100], activation="sigmoid")
    plain = build_model("mlp", (1, 28, 28), 10, hidden=[200, 100], activation="sigmoid")
    plain.load_state_dict(fused.state_dict())
    opt_fused = make_optimizer("adam", list(fused.parameters()), 1e-3)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-3, foreach=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        x, y = torch.randn(32, 1, 28, 28, generator=generator), torch.randint(0, 10, (32,), generator=generator)
        for model, opt in ((fused, opt_fused), (plain, opt_plain)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # float32 rounding of 50 steps, nothing more
    assert any(g["fused"] for g in opt_fused.param_groups)


def test_cosine_schedule_is_torchs_cosine_annealing_stepped_once_per_round():
    import math

    import torch

    from fedvb.core.trainers import lr_in_round

    rounds, lr = 7, 0.3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=rounds, eta_min=0.0)
    for server_round in range(1, rounds + 1):
        assert math.isclose(lr_in_round(lr, "cosine", server_round, rounds), opt.param_groups[0]["lr"], rel_tol=1e-12)
        assert lr_in_round(lr, "constant", server_round, rounds) == lr
        opt.step()
        scheduler.step()


# -- the MAP step's weight decay and gradient clipping (the papers' code's options) -------------------------------


def _map_trainer(optimizer: str, **settings):
    from fedvb.core.trainers import LocalSettings, TorchTrainer

    torch.manual_seed(0)
    model = build_model("mlp", (6,), 3, hidden=[5], activation="sigmoid").double()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (40,), generator=generator)
    local = LocalSettings(lr=0.05, local_epochs=3, batch_size=8, optimizer=optimizer, **settings)
    return TorchTrainer(model, x, y, "classification", local)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_is_the_isotropic_penalty_of_precision_decay_times_n_over_tau(optimizer):
    """The map step descends mean loss + (tau / N) penalty, so torch's weight decay w is the isotropic penalty
    A = w N / tau with no linear part: the two runs agree to float rounding."""
    from fedvb.core.gaussian import ISOTROPIC, NaturalParams

    decayed = _map_trainer(optimizer, weight_decay=0.3)
    start = decayed.get_flat().clone()
    by_decay = decayed.map(start, None, temperature=0.5, generator=torch.Generator().manual_seed(2))
    plain = _map_trainer(optimizer)
    penalty = NaturalParams(torch.zeros_like(start), torch.tensor(0.3 * 40 / 0.5, dtype=start.dtype), ISOTROPIC)
    by_penalty = plain.map(start, penalty, temperature=0.5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(by_decay, by_penalty, rtol=1e-10, atol=1e-12)
    assert (by_decay - start).abs().max() > 1e-3  # it trained


def test_a_clipped_sgd_step_moves_at_most_lr_times_the_clip():
    clip, steps = 1e-3, 3 * 5  # 3 epochs of 5 batches
    trainer = _map_trainer("sgd", grad_clip=clip)
    start = trainer.get_flat().clone()
    end = trainer.map(start, None, generator=torch.Generator().manual_seed(2))
    assert 0 < (end - start).norm() <= steps * 0.05 * clip * (1 + 1e-9)
    unclipped = _map_trainer("sgd").map(start, None, generator=torch.Generator().manual_seed(2))
    assert (unclipped - start).norm() > 10 * steps * 0.05 * clip  # the clip, not the data, held it


def test_a_kept_adam_state_continues_one_adam_across_rounds():
    """optimizer_state = "kept" (the papers' code): round 2's Adam starts from round 1's moments and step count,
    so two rounds are one torch Adam (single-tensor) run over both rounds' batches; a fresh Adam is not."""
    trainer = _map_trainer("adam", optimizer_state="kept")
    start = trainer.get_flat().clone()
    trainer.carry_optimizer({})
    middle = trainer.map(start, None, generator=torch.Generator().manual_seed(2))
    carried = trainer.carried_optimizer()
    assert set(carried) == {"adam_step", "adam_exp_avg", "adam_exp_avg_sq"} and float(carried["adam_step"]) == 15
    trainer.carry_optimizer(carried)
    end = trainer.map(middle, None, generator=torch.Generator().manual_seed(3))
    assert float(trainer.carried_optimizer()["adam_step"]) == 30

    reference = _map_trainer("adam").model  # the same initial weights, then one Adam over both rounds
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.05, foreach=False)
    x, y = trainer.x, trainer.y
    for seed in (2, 3):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(3):  # local epochs
            order = torch.randperm(40, generator=generator)
            for rows in order.split(8):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(reference(x[rows]), y[rows]).backward()
                optimizer.step()
    expected = torch.nn.utils.parameters_to_vector(reference.parameters()).detach()
    torch.testing.assert_close(end, expected, rtol=1e-9, atol=1e-11)

    fresh = _map_trainer("adam")
    assert fresh.carried_optimizer() == {}
    again = fresh.map(middle, None, generator=torch.Generator().manual_seed(3))
    assert fresh.carried_optimizer() == {} and (again - expected).abs().max() > 1e-4  # a new Adam goes elsewhere


def test_a_carried_adam_state_that_does_not_fit_the_model_is_refused():
    trainer = _map_trainer("adam", optimizer_state="kept")
    dim = trainer.get_flat().numel()
    wrong = {"adam_step": torch.tensor(3.0, dtype=torch.float64), "adam_exp_avg": torch.zeros(dim + 1),
             "adam_exp_avg_sq": torch.zeros(dim + 1)}  # fmt: skip
    trainer.carry_optimizer(wrong)
    with pytest.raises(ValueError, match="adam_exp_avg"):
        trainer.map(trainer.get_flat(), None, generator=torch.Generator().manual_seed(2))


# -- the diagonal GGN of the Laplace clients ---------------------------------------------------------------------


def _definition(trainer, theta, labels=None):
    """The diagonal GGN by its definition, one example and one class at a time with autograd:
    ``sum_i sum_c p_ic (grad log p_ic)^2`` (classification; ``labels``: one label each, weight 1),
    ``sum_i sum_o (grad f_io)^2`` (regression)."""
    trainer.set_flat(theta)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(trainer.num_examples):
        out = trainer.model(trainer.x[i : i + 1])[0]
        if trainer.task == "regression":
            rows = [(o, 1.0) for o in out.reshape(-1)]
        else:
            logp = torch.log_softmax(out, -1)
            classes = [int(labels[i])] if labels is not None else range(len(logp))
            rows = [(logp[c], 1.0 if labels is not None else float(logp[c].detach().exp())) for c in classes]
        for value, weight in rows:
            grads = torch.autograd.grad(value, params, retain_graph=True)
            total += weight * torch.cat([g.reshape(-1) for g in grads]).double() ** 2
    return total


def _trainer(model_name, task, curvature="exact", **options):
    from fedvb.core.trainers import LocalSettings, TorchTrainer

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(23, 6, generator=generator)
    y = torch.randint(0, 4, (23,), generator=generator) if task == "classification" else torch.randn(23)
    model = build_model(model_name, (6,), 4 if task == "classification" else 0, **options)
    settings = LocalSettings(curvature_batch=8, curvature=curvature)
    return TorchTrainer(model, x, y, task, settings)


CASES = [("mlp", "classification", {"hidden": [5, 3], "activation": "sigmoid"}), ("softmax", "classification", {}),
         ("linear", "regression", {})]  # fmt: skip


@pytest.mark.parametrize("model_name, task, options", CASES)
def test_the_per_layer_ggn_and_the_jacobian_ggn_are_the_definition(model_name, task, options):
    trainer = _trainer(model_name, task, **options)
    theta = torch.randn(trainer.get_flat().numel(), generator=torch.Generator().manual_seed(1))
    expected = _definition(trainer, theta)
    assert _linear_layers(trainer.model) is not None  # the per-layer path is the one taken
    torch.testing.assert_close(trainer.curvature(theta).double(), expected, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(trainer._jacobian_curvature(trainer.model, None).double(), expected, rtol=2e-5,
                               atol=1e-7)  # fmt: skip


def test_a_model_with_other_layers_takes_the_jacobian_path():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 4))
    assert _linear_layers(model) is None


def test_the_monte_carlo_ggn_is_the_definition_at_its_drawn_labels_and_unbiased():
    trainer = _trainer("mlp", "classification", curvature="mc", hidden=[5], activation="tanh")
    theta = torch.randn(trainer.get_flat().numel(), generator=torch.Generator().manual_seed(2))
    trainer.set_flat(theta)
    with torch.no_grad():
        probs = trainer.model(trainer.x).softmax(-1)
    # the labels the estimate draws: one per example, batch by batch, from the same stream
    draws, labels = torch.Generator().manual_seed(5), []
    for start in range(0, trainer.num_examples, 8):
        labels.append(torch.multinomial(probs[start : start + 8].double(), 1, generator=draws)[:, 0])
    estimate = trainer.curvature(theta, generator=torch.Generator().manual_seed(5)).double()
    torch.testing.assert_close(estimate, _definition(trainer, theta, torch.cat(labels)), rtol=2e-5, atol=1e-7)
    exact = _definition(trainer, theta)
    mean = torch.stack([trainer.curvature(theta, generator=torch.Generator().manual_seed(s)).double()
                        for s in range(400)]).mean(0)  # fmt: skip
    assert abs(mean.sum() / exact.sum() - 1) < 0.03  # 400 draws: a bias of 3% would show
    assert torch.corrcoef(torch.stack([mean, exact]))[0, 1] > 0.99
