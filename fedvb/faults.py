"""Fault injection: make chosen clients fail in chosen ways, to test and demonstrate that runs survive.

The ``faults`` configuration key is a comma-separated list ``kind=fraction``,
e.g. ``"raise=0.1,nan=0.1"``: in every round (and every retry of a round) each
sampled client independently suffers at most one fault, kind ``k`` with
probability ``fraction_k``.  The draw depends only on (seed, round, attempt,
client), so a run with faults is as reproducible as one without.

The ``attack`` key makes chosen clients send crafted replies instead
(``"huge@0"``: client 0 in every round; ``"takeover@0:once"``: in round 1
only), to test and show what the server's screen and bounds hold
(:mod:`fedvb.core.robust`).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ATTACKS",
    "FAULT_KINDS",
    "attack_reply",
    "attacks_now",
    "before_attacking",
    "before_training",
    "choose_fault",
    "corrupt_reply",
    "parse_attack",
    "parse_faults",
]

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


# -- crafted replies: one or more chosen clients attack, to test and show what the server's defences hold ------
ATTACKS = {
    "huge": "every tensor of the reply (the example count aside) set to 1e10, precisions to 1e30",
    "takeover": "the mean set to a chosen vector (all 5.0) with a precision of 1e30, where there is one",
    "sites": "a sent control variate (SCAFFOLD's delta_control) set to 1e6; BayesADMM replies carry no site",
    "examples": "num_examples set to 1e30 (all the weight of an example-weighted average)",
    "sign-flip": "every tensor's change from the server's mirrored and tenfold (mean -> m - 10 (mean - m))",
    "silent": "no reply at all (the client raises before training): what a defence that refuses the attacker "
    "leaves, the reference for the others",
}


def parse_attack(spec: str) -> tuple[str, tuple[int, ...], bool]:
    """``"huge@0,3"`` (every round) or ``"huge@0:once"`` (round 1 only) -> (kind, clients, once); ValueError
    naming what is wrong; ``""`` -> ("", (), False)."""
    if not spec.strip():
        return "", (), False
    kind, _, rest = spec.strip().partition("@")
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; allowed: {', '.join(ATTACKS)} (as KIND@CLIENTS[:once])")
    clients, _, when = rest.partition(":")
    try:
        chosen = tuple(sorted({int(c) for c in clients.split(",") if c.strip()}))
    except ValueError:
        raise ValueError(f"expected KIND@CLIENTS[:once] with comma-separated client numbers, got {spec!r}") from None
    if not chosen or min(chosen) < 0 or when not in ("", "once"):
        raise ValueError(f"expected KIND@CLIENTS[:once] with client numbers >= 0, got {spec!r}")
    return kind, chosen, when == "once"


def attacks_now(spec: str, *, server_round: int, partition_id: int) -> str:
    """The kind of attack this client makes in this round under ``spec`` ("" where it makes none)."""
    kind, clients, once = parse_attack(spec)
    if not kind or partition_id not in clients or (once and server_round != 1):
        return ""
    return kind


def before_attacking(spec: str, *, server_round: int, partition_id: int) -> None:
    """A ``silent`` attacker raises before it trains, so the server sees no reply from it."""
    if attacks_now(spec, server_round=server_round, partition_id=partition_id) == "silent":
        raise RuntimeError("attack: this client sends no reply")


def attack_reply(
    spec: str,
    reply: dict[str, Tensor],
    payload: dict[str, Tensor],
    *,
    server_round: int,
    partition_id: int,
) -> dict[str, Tensor]:
    """The reply as the attack ``spec`` crafts it, for the clients and rounds it names (else unchanged)."""
    kind = attacks_now(spec, server_round=server_round, partition_id=partition_id)
    if kind in ("", "silent"):
        return reply
    crafted = dict(reply)
    tensors = [k for k in reply if k != "num_examples"]
    if kind == "huge":
        for name in tensors:
            crafted[name] = torch.full_like(reply[name], 1e30 if "precision" in name or "quadratic" in name else 1e10)
    elif kind == "takeover":
        for name in ("mean", "delta_mean", "delta"):
            if name in reply:
                crafted[name] = torch.full_like(reply[name], 5.0)
        if "precision" in reply:
            crafted["precision"] = torch.full_like(reply["precision"], 1e30)
    elif kind == "sites":
        if "delta_control" in reply:
            crafted["delta_control"] = torch.full_like(reply["delta_control"], 1e6)
    elif kind == "examples":
        crafted["num_examples"] = torch.tensor(1e30)
    else:  # sign-flip
        for name in tensors:
            centre = payload.get(name)
            if centre is not None and centre.shape == reply[name].shape and "precision" not in name:
                crafted[name] = centre - 10.0 * (reply[name] - centre)
            elif "precision" not in name and "quadratic" not in name:
                crafted[name] = -10.0 * reply[name]
    return crafted
