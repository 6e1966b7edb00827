"""A small byte-level GPT (vocabulary 256) for the main job and the benchmarks.

Pre-LayerNorm transformer blocks, causal ``scaled_dot_product_attention``, learned positions,
output head tied to the token embedding (so DiLoCo's tied-weight handling is exercised on every
run). Sizes (parameters; step times measured on the 2-core CPU machine, seq 128, batch 16,
2 processes with 1 thread each, torch 2.13): ``tiny`` 0.13M, ``small`` 0.82M (~0.17 s/step),
``medium`` 1.86M (~0.32 s/step), ``large`` 3.6M (~0.55 s/step).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GPTConfig", "GPT", "MODEL_SIZES", "STEP_SECONDS_2CPU", "config_for"]


@dataclasses.dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    seq_len: int = 128
    vocab_size: int = 256


#: name -> seconds per training step measured with 2 worker processes on 2 CPU cores, one thread
#: each (seq 128, batch 16, torch 2.13); the main job's start line estimates the run time from it
STEP_SECONDS_2CPU = {"tiny": 0.05, "small": 0.17, "medium": 0.32, "large": 0.55}

#: name -> (n_layer, n_head, d_model)
MODEL_SIZES = {
    "tiny": (2, 4, 64),
    "small": (4, 4, 128),
    "medium": (6, 5, 160),
    "large": (8, 6, 192),
}


def config_for(size: str, seq_len: int = 128) -> GPTConfig:
    if size not in MODEL_SIZES:
        raise ValueError(f"model size: expected one of {sorted(MODEL_SIZES)}, got {size!r}")
    n_layer, n_head, d = MODEL_SIZES[size]
    return GPTConfig(n_layer=n_layer, n_head=n_head, d_model=d, seq_len=seq_len)


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model must be divisible by n_head, got {cfg.d_model} and {cfg.n_head}")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.apply(self._init)
        nn.init.normal_(self.pos, std=0.02)
        for blk in self.blocks:  # GPT-2 residual scaling keeps early training stable
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
            nn.init.normal_(blk.out.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos[:t]
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
