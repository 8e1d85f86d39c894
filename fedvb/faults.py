"""Fault injection: make chosen clients fail in chosen ways, to test and demonstrate that runs survive.

The ``faults`` configuration key is a comma-separated list ``kind=fraction``,
e.g. ``"raise=0.1,nan=0.1"``: in every round (and every retry of a round) each
sampled client independently suffers at most one fault, kind ``k`` with
probability ``fraction_k``.  The draw depends only on (seed, round, attempt,
client), so a run with faults is as reproducible as one without.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

__all__ = ["FAULT_KINDS", "before_training", "choose_fault", "corrupt_reply", "parse_faults"]

FAULT_KINDS = {
    "raise": "the client raises before training",
    "timeout": "the client replies only after twice client_timeout_s",
    "nan": "a NaN in the reply's first tensor",
    "inf": "an Inf in the reply's first tensor",
    "shape": "the reply's first tensor loses its last entry",
    "dtype": "the reply's first tensor arrives as float16",
    "negative-precision": "the reply's precision is negated (strategies with a posterior)",
}


def parse_faults(spec: str) -> dict[str, float]:
    """``"raise=0.1,nan=0.2"`` -> ``{"raise": 0.1, "nan": 0.2}``; ValueError naming what is wrong."""
    fractions: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, value = item.partition("=")
        kind = kind.strip()
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; allowed: {', '.join(FAULT_KINDS)}")
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"expected {kind}=FRACTION, got {item!r}") from None
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{kind} fraction must be in [0, 1], got {fraction}")
        fractions[kind] = fraction
    if sum(fractions.values()) > 1.0 + 1e-12:
        raise ValueError(f"fractions add up to {sum(fractions.values()):g}; at most 1")
    return fractions


def choose_fault(spec: str, *, seed: int, server_round: int, attempt: int, partition_id: int) -> str | None:
    """The fault this client suffers in this attempt of this round, or None."""
    fractions = parse_faults(spec)
    if not fractions:
        return None
    u = np.random.default_rng(np.random.SeedSequence([seed, server_round, attempt, partition_id, 13])).random()
    for kind, fraction in fractions.items():
        if u < fraction:
            return kind
        u -= fraction
    return None


def before_training(kind: str | None, timeout_s: float) -> None:
    """The faults that strike before the client trains: raising and stalling."""
    if kind == "raise":
        raise RuntimeError("injected fault: client raised")
    if kind == "timeout":
        time.sleep(2 * timeout_s)


def corrupt_reply(kind: str | None, reply: dict[str, Tensor]) -> dict[str, Tensor]:
    """The reply as the fault ``kind`` damages it (unchanged for None and the pre-training faults)."""
    if kind not in ("nan", "inf", "shape", "dtype", "negative-precision"):
        return reply
    damaged = dict(reply)
    if kind == "negative-precision":
        damaged["precision"] = -reply["precision"]
        return damaged
    name = next(k for k in reply if k != "num_examples")
    value = reply[name].clone()
    if kind in ("nan", "inf"):
        value.view(-1)[0] = float("nan") if kind == "nan" else float("inf")
    elif kind == "shape":
        value = value.reshape(-1)[:-1]
    else:
        value = value.to(torch.float16)
    damaged[name] = value
    return damaged
