"""P-tuning's prompt encoder (Liu et al. 2021, §3.2): h_i = MLP([LSTM→(h_{0:i}) : LSTM←(h_{i:m})]).

The virtual tokens are not free parameters but the output of a small network over trainable inputs,
which couples them and eases optimisation. Layer layout as in HF PEFT (``mlp_head``, ``lstm_head``),
so the same initial state trains the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from ..prompt_encoder import VirtualTokens
from .config import PromptEncoderConfig


class PromptEncoder(VirtualTokens):
    def __init__(self, config: PromptEncoderConfig, d_model: int) -> None:
        super().__init__(config.num_virtual_tokens, d_model)
        h = config.encoder_hidden_size
        self.kind = config.encoder_reparameterization_type
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(d_model, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d_model))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d_model, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, d_model))

    def encode(self, table: torch.Tensor) -> torch.Tensor:
        if self.kind == "LSTM":
            return self.mlp_head(self.lstm_head(table[None])[0][0])  # (P, 2h) → (P, d)
        return self.mlp_head(table)  # (P, d)
