"""Offline datasets, partitions over clients, and the label-distribution picture."""

from fedvb.data.datasets import (
    DATASETS,
    GENERATED,
    PREPROCESSING,
    Dataset,
    dataset_available,
    load_dataset,
    stratified_split,
)
from fedvb.data.locate import DataNotFoundError, search_dirs
from fedvb.data.partition import SCHEMES, local_test_split, parse_class_counts, partition_indices
from fedvb.data.plots import plot_label_distribution

__all__ = [
    "DATASETS",
    "GENERATED",
    "PREPROCESSING",
    "SCHEMES",
    "DataNotFoundError",
    "Dataset",
    "dataset_available",
    "load_dataset",
    "local_test_split",
    "parse_class_counts",
    "partition_indices",
    "plot_label_distribution",
    "search_dirs",
    "stratified_split",
]
