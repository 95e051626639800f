"""matryoshka-lora: train one LoRA adapter whose every rank prefix is a usable adapter."""

from .config import MatryoshkaConfig
from .metrics import aurac, log_aurac
from .model import draw_rank, get_controller, get_matryoshka_model, set_rank, set_row_ranks
from .saving import load_matryoshka_model, save_matryoshka
from .weighting import default_ranks, prefix_weights, rank_scale, rank_weights

__version__ = "0.1.0"

__all__ = [
    "MatryoshkaConfig",
    "aurac",
    "default_ranks",
    "draw_rank",
    "get_controller",
    "get_matryoshka_model",
    "load_matryoshka_model",
    "log_aurac",
    "prefix_weights",
    "rank_scale",
    "rank_weights",
    "save_matryoshka",
    "set_rank",
    "set_row_ranks",
]
