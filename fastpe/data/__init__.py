"""Datasets for sequential recommendation: readers, leave-one-out split, batches, synthetic data.

Imports only numpy (and the standard library); the trainer turns the numpy batches into tensors.
"""

from fastpe.data.readers import (
    DataFormatError,
    InteractionData,
    read_dataset,
    read_item_attributes_json,
    read_pairs,
    read_recbole,
    read_sequences,
    sniff_format,
)
from fastpe.data.split import (
    TIME_FEATURES,
    Batch,
    EvalSet,
    Split,
    epoch_batches,
    eval_set,
    leave_one_out,
    pad_batch,
    pad_left,
    sample_eval_negatives,
    time_features,
    training_examples,
)
from fastpe.data.synthetic import synthetic_dataset
from fastpe.data.registry import NAMED_DATASETS, default_data_root, load_dataset

__all__ = [
    "NAMED_DATASETS",
    "TIME_FEATURES",
    "Batch",
    "DataFormatError",
    "EvalSet",
    "InteractionData",
    "Split",
    "default_data_root",
    "epoch_batches",
    "eval_set",
    "leave_one_out",
    "load_dataset",
    "pad_batch",
    "pad_left",
    "read_dataset",
    "read_item_attributes_json",
    "read_pairs",
    "read_recbole",
    "read_sequences",
    "sample_eval_negatives",
    "sniff_format",
    "synthetic_dataset",
    "time_features",
    "training_examples",
]
