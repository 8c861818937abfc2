"""Training: data (jsonl -> fixed-length sequences), OPUT / masked-diffusion objectives (oput),
the trainer (AdamW, DDP/FSDP2, checkpoints with exact resume) and self-distillation."""
from .checkpoint import CheckpointError
from .data import TokenizedData, load_training_data, tokenize_records
from .oput import DiffusionConfig
from .trainer import TrainConfig, Trainer

__all__ = ["CheckpointError", "DiffusionConfig", "TokenizedData", "TrainConfig", "Trainer",
           "load_training_data", "tokenize_records"]
