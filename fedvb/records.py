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
    "narrowed",
    "split_reply",
    "to_array_record",
    "widened",
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


def narrowed(arrays: dict[str, Tensor]) -> dict[str, Tensor]:
    """``arrays`` with each float64 tensor that float32 holds exactly sent as float32: half the bytes, the same
    numbers once :func:`widened` (a reply the model computed in float32, as an IVON posterior on a float32
    model, is such a tensor; a float64 solver's is not, and goes as it is)."""
    narrow = {}
    for name, value in arrays.items():
        if value.dtype == torch.float64:
            single = value.float()
            if torch.equal(single.double(), value):
                value = single
        narrow[name] = value
    return narrow


def widened(arrays: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """``arrays`` with each float32 tensor in ``dtype`` where that is float64 (every float32 is a float64, so
    exactly what a client sent before :func:`narrowed`); any other tensor as it came."""
    if dtype != torch.float64:
        return arrays
    return {name: value.double() if value.dtype == torch.float32 else value for name, value in arrays.items()}


def split_reply(reply: dict[str, Tensor], partition_id: int) -> tuple[ArrayRecord, MetricRecord]:
    """A client reply as one ArrayRecord (:func:`narrowed`) and one MetricRecord holding ``num-examples``
    (Flower's FedAvg needs both)."""
    arrays = dict(reply)
    count = float(arrays.pop("num_examples"))
    return to_array_record(narrowed(arrays)), MetricRecord({"num-examples": count, "partition-id": partition_id})


def join_reply(
    arrays: ArrayRecord, metrics: MetricRecord, *, consume: bool = False, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """The reply :func:`split_reply` made; ``dtype``: its tensors :func:`widened` to the server's."""
    reply = from_array_record(arrays, consume=consume)
    if dtype is not None:
        reply = widened(reply, dtype)
    reply["num_examples"] = torch.tensor(float(metrics["num-examples"]))
    return reply
