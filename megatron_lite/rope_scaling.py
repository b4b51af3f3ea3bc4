"""RopeScaling, the one model setting the config schema (config.py) shares with the model: its own module, so that
reading the configuration (the data preparation command does) does not import torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RopeScaling:
    """Llama-3 RoPE frequency scaling (HF `rope_type: llama3`): long wavelengths slowed down by `factor`."""
    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
