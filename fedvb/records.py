"""Named tensors to and from Flower records (the only conversion the Flower layers do)."""

from __future__ import annotations

import functools
import json

import torch
from flwr.app import ArrayRecord, MetricRecord
from torch import Tensor

from fedvb.config import RunConfig
from fedvb.parsing import PARSING

__all__ = [
    "CONFIG_KEY",
    "config_from_json",
    "config_to_json",
    "from_array_record",
    "join_reply",
    "split_reply",
    "to_array_record",
]


def to_array_record(arrays: dict[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({name: value.detach().cpu() for name, value in arrays.items()})


def from_array_record(record: ArrayRecord, *, consume: bool = False) -> dict[str, Tensor]:
    """The record's tensors; ``consume``: emptying the record as it goes, so that its bytes are freed as each
    tensor is built (a server taking in a large cohort holds one copy of a reply, not two)."""
    with PARSING:  # each array's .npy header is parsed with ast.literal_eval (fedvb.parsing)
        return dict(record.to_torch_state_dict(keep_input=not consume))


CONFIG_KEY = "fedvb-config"


def config_to_json(config: RunConfig) -> str:
    """The run configuration as one string: one ConfigRecord entry instead of forty (cheaper per message)."""
    return json.dumps(config.as_dict(), sort_keys=True)


@functools.lru_cache(maxsize=16)
def config_from_json(text: str) -> RunConfig:
    return RunConfig.from_mapping(json.loads(text))


def split_reply(reply: dict[str, Tensor], partition_id: int) -> tuple[ArrayRecord, MetricRecord]:
    """A client reply as one ArrayRecord and one MetricRecord holding ``num-examples`` (Flower's FedAvg needs both)."""
    arrays = dict(reply)
    count = float(arrays.pop("num_examples"))
    return to_array_record(arrays), MetricRecord({"num-examples": count, "partition-id": partition_id})


def join_reply(arrays: ArrayRecord, metrics: MetricRecord, *, consume: bool = False) -> dict[str, Tensor]:
    reply = from_array_record(arrays, consume=consume)
    reply["num_examples"] = torch.tensor(float(metrics["num-examples"]))
    return reply
