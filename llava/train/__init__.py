"""Training: the data path (records -> ids, labels, pixels), the stages and the trainer.

    from llava.train import TrainConfig, train
    train(TrainConfig(stage="finetune", model="runs/s1", data="chat.json", image_folder="images", out="runs/s2"))
"""

from llava._lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    **dict.fromkeys(["IGNORE_INDEX", "LabelError", "build_example"], "llava.processing.labels"),
    **dict.fromkeys(["STAGES", "TrainConfig"], "llava.train.config"),
    **dict.fromkeys(["BadRow", "DataError", "Report", "SupervisedDataset", "check_dataset", "collate",
                     "load_records", "parse_record", "validate_record"], "llava.train.data"),
    "train": "llava.train.loop",
})

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
