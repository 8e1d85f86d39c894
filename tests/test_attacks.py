"""One attacker of five, every crafted reply of fedvb.faults.ATTACKS, every round and once, each strategy under its
defence (simulations/attacks.py DEFENCES: clipping, or the trimmed mean where clipping does not hold): the server
never crashes, every run completes, the clip engages on every crafted reply, and each crafted magnitude, site or
example count leaves the final accuracy at most MARGIN (0.05) below the honest run's or below the run in which
the attacker sent nothing (what any defence that refuses it leaves). The README's table is made by the script."""

import logging
import sys
from pathlib import Path

import pytest

from fedvb.config import STRATEGIES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simulations"))

from attacks import CASES, CLIP, DEFENCES, MUST_HOLD, attacked_run, held, silent_case  # noqa: E402

ROUNDS = 4
# the attacks each strategy's replies can carry (sites: those that send a control variate; a BayesADMM reply
# holds no site, the server computes them)
SENDS_SITES = ("scaffold",)
# A known hole (README, "Crafted replies"): a sign-flipped reply to the dense Newton variant passes the screen and
# leaves every honest client's cavity not positive definite, so the run stops cleanly in round 2. Pinned, so that
# the day the server checks the cavities it hands out this test says so.
STOPS = {("bayes-admm-newton", "sign-flip@0"), ("bayes-admm-newton", "sign-flip@0:once")}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_attacker_of_five_neither_crashes_nor_moves_the_model_past_the_margin(strategy, tmp_path):
    honest = attacked_run(strategy, "honest", tmp_path)
    assert honest["status"] == "completed" and honest["clipped"] == honest["honest_rejected"] == 0, honest
    assert honest["outliers"] == honest["honest_outliers"] == 0, honest
    silent: dict[str, dict] = {}  # the attacker-silent references, run where a case is not held by the honest run
    for case in CASES[1:]:
        kind = case.split("@")[0]
        if kind == "silent" or (kind == "sites" and strategy not in SENDS_SITES):
            continue  # a reference, or nothing to craft
        result = attacked_run(strategy, case, tmp_path)
        if (strategy, case) in STOPS:
            assert result["status"] == "stopped" and result["reason"].startswith(
                "round 2: 0 accepted replies, min_replies is 1"
            )
            continue
        assert result["status"] in ("completed", "completed_with_losses"), (case, result)
        crafted = 1 if case.endswith(":once") else ROUNDS
        if kind != "sign-flip" and DEFENCES[strategy] is CLIP:  # a mirrored change may lie within the bound
            assert result["rejected"] + result["clipped"] >= crafted, (case, result)
        if kind in MUST_HOLD and not held(result, honest, honest):
            reference = silent_case(case)
            if reference not in silent:
                silent[reference] = attacked_run(strategy, reference, tmp_path)
            assert held(result, honest, silent[reference]), (case, result, honest, silent[reference])


@pytest.mark.parametrize(("strategy", "case"), [("fedavg", "huge@0"), ("ivon-admm", "takeover@0")])
def test_with_no_defence_a_crafted_reply_is_named_an_outlier_not_taken_silently(strategy, case, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedvb")
    undefended = {"robust_clip": 0.0, "combine": "mean"}  # the default
    result = attacked_run(strategy, case, tmp_path, undefended)
    assert result["outliers"] == ROUNDS and result["honest_outliers"] == 0, result
    warnings = [r.getMessage() for r in caplog.records if "moved the model more than 1000 times" in r.getMessage()]
    assert len(warnings) == ROUNDS and all("client(s) 0 " in w for w in warnings), warnings
