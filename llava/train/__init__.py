"""Training: the data path (records -> ids, labels, pixels), the stages and the trainer.

    from llava.train import TrainConfig, train
    train(TrainConfig(stage="finetune", model="runs/s1", data="chat.json", image_folder="images", out="runs/s2"))
"""

from llava.processing.labels import IGNORE_INDEX, LabelError, build_example
from llava.train.config import STAGES, TrainConfig
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
from llava.train.loop import train

__all__ = [
    "STAGES",
    "TrainConfig",
    "train",
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
