"""Client faults: every kind is rejected with a reason, the client's site and state stay as they were, and the
round completes with the others -- the run equals the plain loop with the faulty replies left out."""

import json

import numpy as np
import pytest
import torch

from fedvb.backends import run
from fedvb.config import RunConfig
from fedvb.core.client_store import MemoryStore
from fedvb.core.driver import sample_participants
from fedvb.experiment import client_generator, initial_mean, make_algorithm, make_trainer
from fedvb.faults import FAULT_KINDS, choose_fault, corrupt_reply, parse_faults

REASONS = {
    "raise": "client error: RuntimeError: injected fault",
    "nan": "non-finite values",
    "inf": "non-finite values",
    "shape": "has shape",
    "dtype": "has dtype torch.float16",
    "negative-precision": "precision:",
}


def fault_config(tmp_path, faults: str, **changes) -> RunConfig:
    values = dict(strategy="ivon-admm", dataset="synthetic-logistic", model="softmax", num_clients=5, rounds=3,
                  lr=0.002, ivon_beta2=0.999, local_epochs=2, batch_size=16, eval_samples=0, faults=faults,
                  out=str(tmp_path / "run"))  # fmt: skip
    values.update(changes)
    return RunConfig.from_mapping(values)


def mean_without_faulty_replies(config: RunConfig) -> torch.Tensor:
    """The plain loop in which every client hit by a fault in attempt 0 simply does not reply."""
    algorithm = make_algorithm(config)
    trainers = [make_trainer(config, k) for k in range(config.num_clients)]
    store = MemoryStore()  # each client's state as the server keeps it (its site is the server's record)
    server = algorithm.attach(algorithm.init_server(initial_mean(config), config.num_clients), store)
    for r in range(1, config.rounds + 1):
        payload, replies, states = algorithm.payload(server), {}, {}
        for k in sample_participants(config.num_clients, config.fraction_train, seed=config.seed, server_round=r):
            if choose_fault(config.faults, seed=config.seed, server_round=r, attempt=0, partition_id=k) is None:
                replies[k], states[k] = algorithm.client_round(
                    payload, store.get(k), trainers[k], generator=client_generator(config, r, k)
                )
        server = algorithm.commit(algorithm.server_round(server, replies, config.num_clients), states, store)
    return algorithm.server_mean(server)


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_each_fault_kind_is_rejected_and_the_run_goes_on(kind, tmp_path):
    config = fault_config(tmp_path, f"{kind}=0.4")
    run(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reasons = [r["reason"] for row in rows for r in row["rejected"]]
    assert reasons and all(REASONS[kind] in reason for reason in reasons)
    assert all(row["retries"] == 0 for row in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed_with_losses" and summary["round"] == 3  # never a silent "completed"
    assert summary["rejected_replies"] == len(reasons)
    assert summary["rejected_clients"] == sorted({r["client"] for row in rows for r in row["rejected"]})
    with np.load(tmp_path / "run" / "posterior.npz") as z:
        assert np.isfinite(z["mean"]).all() and (z["precision"] > 0).all()
        np.testing.assert_allclose(z["mean"], mean_without_faulty_replies(config).numpy(), rtol=1e-6, atol=1e-7)


def test_a_client_that_times_out_is_left_out(tmp_path):
    config = fault_config(tmp_path, "timeout=0.4", client_timeout_s=0.5, rounds=2)
    run(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    with np.load(tmp_path / "run" / "posterior.npz") as z:
        np.testing.assert_allclose(z["mean"], mean_without_faulty_replies(config).numpy(), rtol=1e-6, atol=1e-7)
    assert [r["round"] for r in rows] == [1, 2]


def test_too_few_replies_retries_the_round_then_stops_with_state_saved(tmp_path):
    # every reply fails in every attempt: the run stops after round 1's retries, nothing aggregated
    config = fault_config(tmp_path, "raise=1.0", round_retries=2)
    run(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped" and "0 accepted replies, min_replies is 1" in summary["reason"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""
    with np.load(tmp_path / "run" / "posterior.npz") as z:
        np.testing.assert_array_equal(z["mean"], initial_mean(config).numpy())


def test_a_retried_round_succeeds_when_enough_clients_answer(tmp_path):
    config = fault_config(tmp_path, "nan=0.4", min_replies=5, round_retries=30, rounds=2)
    run(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed_with_losses"
    assert rows[0]["retries"] >= 1 and len(rows[0]["rejected"]) >= rows[0]["retries"]  # every attempt's rejects
    with np.load(tmp_path / "run" / "posterior.npz") as z:
        assert np.isfinite(z["mean"]).all()


def test_fault_specs_are_validated():
    assert parse_faults("raise=0.1, nan=0.2") == {"raise": 0.1, "nan": 0.2}
    for spec, message in [("melt=0.1", "unknown fault 'melt'"), ("nan=2", "must be in"), ("nan=0.6,inf=0.6", "add up")]:
        with pytest.raises(ValueError, match=message):
            parse_faults(spec)
    assert set(REASONS) | {"timeout"} == set(FAULT_KINDS)


def test_corrupted_replies_look_as_documented():
    reply = {"mean": torch.ones(4, dtype=torch.float64), "precision": torch.ones(4, dtype=torch.float64),
             "num_examples": torch.tensor(3.0)}  # fmt: skip
    assert torch.isnan(corrupt_reply("nan", reply)["mean"][0])
    assert corrupt_reply("shape", reply)["mean"].shape == (3,)
    assert corrupt_reply("dtype", reply)["mean"].dtype == torch.float16
    assert (corrupt_reply("negative-precision", reply)["precision"] < 0).all()
    assert corrupt_reply(None, reply) is reply and torch.equal(reply["mean"], torch.ones(4, dtype=torch.float64))
