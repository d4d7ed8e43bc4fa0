"""Training: the data path (records -> ids, labels, pixels) and, later, the trainer."""

from llava.processing.labels import IGNORE_INDEX, LabelError, build_example
from llava.train.data import (
    BadRow,
    DataError,
    Report,
    SupervisedDataset,
    check_dataset,
    collate,
    load_records,
    parse_record,
    validate_record,
)

__all__ = [
    "IGNORE_INDEX",
    "LabelError",
    "build_example",
    "BadRow",
    "DataError",
    "Report",
    "SupervisedDataset",
    "check_dataset",
    "collate",
    "load_records",
    "parse_record",
    "validate_record",
]
