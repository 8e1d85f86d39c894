"""One attacker of five, every crafted reply of fedvb.faults.ATTACKS, every round and once: the server never
crashes, every run completes, the defences engage on every crafted reply, and where they hold (the table in
the README, made by simulations/attacks.py) the final accuracy stays within 0.05 of the honest run's."""

import sys
from pathlib import Path

import pytest

from fedvb.config import BAYES_ADMM, STRATEGIES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simulations"))

from attacks import CASES, attacked_run  # noqa: E402

ROUNDS = 4
# the attacks each strategy's replies can carry (sites: those that send sites or control variates)
SENDS_SITES = (*BAYES_ADMM, "scaffold")
# where the bounds hold the final accuracy within MARGIN of the honest run (measured; the README's table)
HELD = {
    "fedavg": ("huge", "takeover", "examples"),
    "fedprox": ("huge", "takeover", "examples"),
    "feddyn": ("huge", "takeover", "examples"),
    "fedadmm": ("huge", "takeover", "examples"),
    "fedlap-func": ("huge", "takeover", "sites", "examples"),
}
MARGIN = 0.05
# A known hole (README, "Crafted replies"): a sign-flipped reply to the dense Newton variant passes the screen and
# leaves every honest client's cavity not positive definite, so the run stops cleanly in round 2. Pinned, so that
# the day the server checks the cavities it hands out this test says so.
STOPS = {("bayes-admm-newton", "sign-flip@0"), ("bayes-admm-newton", "sign-flip@0:once")}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_attacker_of_five_neither_crashes_nor_passes_unbounded(strategy, tmp_path):
    honest = attacked_run(strategy, "honest", tmp_path)
    assert honest["status"] != "stopped" and honest["clipped"] == 0  # honest replies are never clipped
    for case in CASES[1:]:
        kind = case.split("@")[0]
        if kind == "sites" and strategy not in SENDS_SITES:
            continue  # nothing to craft
        result = attacked_run(strategy, case, tmp_path)
        if (strategy, case) in STOPS:
            assert result["status"] == "stopped" and result["reason"].startswith(
                "round 2: 0 accepted replies, min_replies is 1"
            )
            continue
        assert result["status"] in ("completed", "completed_with_losses"), (case, result)
        crafted = 1 if case.endswith(":once") else ROUNDS
        if kind != "sign-flip":  # a mirrored change may lie within the bound; the others never do
            assert result["rejected"] + result["clipped"] >= crafted, (case, result)
        if kind in HELD.get(strategy, ()):
            assert abs(result["accuracy"] - honest["accuracy"]) <= MARGIN, (case, result, honest)


# Where clipping does not hold the crafted magnitudes (the strategies whose sites keep what a clipped reply gave:
# README, "Crafted replies"), the coordinate-wise trimmed mean does: no worse than MARGIN below the honest run under
# the same combination (benchmarks/results/robust.md; a run may end above it, as the trimmed cohort differs).
TRIMMED_HOLDS = ("fedlap-cov", "ivon-admm", "pvi")


@pytest.mark.parametrize("strategy", TRIMMED_HOLDS)
def test_the_trimmed_combination_holds_the_crafted_magnitudes_that_clipping_does_not(strategy, tmp_path):
    honest = attacked_run(strategy, "honest", tmp_path, robust_clip=0.0, combine="trimmed")
    assert honest["status"] == "completed" and honest["honest_rejected"] == 0, honest
    for case in ("huge@0", "huge@0:once", "takeover@0", "takeover@0:once"):
        result = attacked_run(strategy, case, tmp_path, robust_clip=0.0, combine="trimmed")
        assert result["status"] in ("completed", "completed_with_losses"), (case, result)
        assert result["accuracy"] >= honest["accuracy"] - MARGIN, (case, result, honest)
