"""The MAP clients' optimizer: torch's fused Adam gives the single-tensor Adam's trajectory to float tolerance."""

import torch

from fedvb.core.trainers import make_optimizer
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
