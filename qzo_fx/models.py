"""Small reference models for the demo, tests and benchmarks (CPU-sized, random init)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MLP", "SmallCNN", "TinyViT", "TinyLlama", "classification_loss", "next_token_loss"]


class MLP(nn.Sequential):
    """``784-256-10`` by default; any widths via ``sizes``."""

    def __init__(self, sizes: tuple[int, ...] = (784, 256, 10)) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(nn.Flatten(), *layers)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (strided downsampling), global average pool, linear head.

    Strided convolutions rather than max pooling: torch's CPU ``max_pool2d`` costs half of
    such a network's forward while its backward is nearly free, which skews step-time ratios.
    """

    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        widths = (1, channels, 2 * channels, 4 * channels)
        self.features = nn.Sequential(*(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                          nn.BatchNorm2d(b), nn.ReLU())
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A ViT for 1x28x28 images: 7x7 patches, ``depth`` pre-norm blocks, mean-pooled head."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, patch: int = 7, image: int = 28,
                 classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, 2 * dim, causal=False) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


class TinyLlama(nn.Module):
    """A character-level decoder: embeddings, causal pre-norm blocks, tied-free LM head."""

    def __init__(self, vocab: int = 128, dim: int = 64, depth: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, context, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, 4 * dim, causal=True) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, idx):
        x = self.embed(idx) + self.pos[:, : idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def classification_loss(model, batch) -> torch.Tensor:
    """``loss_fn`` for ``(inputs, labels)`` batches: cross-entropy of the model's logits."""
    return F.cross_entropy(model(batch[0]), batch[1])


def next_token_loss(model, batch) -> torch.Tensor:
    """``loss_fn`` for ``(tokens, next tokens)`` batches of a language model."""
    return F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())
