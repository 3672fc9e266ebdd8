"""Hand-written models in the shapes research code takes: raw parameters, tied weights, reused
layers, in-place writes, optional and keyword arguments, recurrent layers, mode branches,
hand-rolled drop path and causal attention, data-dependent control flow."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.zoo.cases import Case, Entry, Floats, Tokens


class FunctionalRaw(nn.Module):
    """F.linear on raw Parameters, then a matmul with a Parameter."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 8) * 0.3), nn.Parameter(torch.zeros(16))
        self.w2 = nn.Parameter(torch.randn(16, 4) * 0.3)

    def forward(self, x):
        return torch.relu(F.linear(x, self.w1, self.b1)) @ self.w2


class EinsumMixer(nn.Module):
    """Token and channel mixing with einsum on raw Parameters (MLP-Mixer written by hand)."""

    def __init__(self, tokens=6, dim=16):
        super().__init__()
        self.token_mix = nn.Parameter(torch.randn(tokens, tokens) / math.sqrt(tokens))
        self.channel_mix = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = x + torch.einsum("st,btd->bsd", self.token_mix, self.norm(x))
        return x + torch.einsum("bsd,de->bse", F.gelu(self.norm(x)), self.channel_mix)


class TiedEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 16), nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


class SharedLinear(nn.Module):
    """One Linear applied three times (weight sharing across depth)."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for _ in range(3):
            h = torch.relu(self.shared(h)) + h
        return self.out(h)


class DataDependent(nn.Module):
    """Python control flow on tensor values."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        if h.mean() > 0:
            h = torch.relu(h)
        return self.b(h)


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, *, scale: float = 2.0):
        return self.fc(x) * scale


class OptionalMask(nn.Module):
    """``forward(x, mask=None)`` called without the mask."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, mask=None):
        h = torch.relu(self.fc1(x))
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.fc2(h).mean(1)


class InPlace(nn.Module):
    """In-place arithmetic on a layer's output, and an in-place ReLU as the last op before a layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc1(x)
        h.mul_(0.5).add_(1.0)
        h -= 0.25
        return self.fc2(h.relu_())


class SliceAssign(nn.Module):
    """Writes a learned token into position 0 in place (``h[:, 0] = ...``)."""

    def __init__(self):
        super().__init__()
        self.proj, self.cls, self.head = nn.Linear(8, 16), nn.Parameter(torch.randn(16) * 0.1), nn.Linear(16, 4)

    def forward(self, x):
        h = self.proj(x)
        h[:, 0] = self.cls
        return self.head(torch.tanh(h))[:, 0]


class LSTMTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm, self.out = nn.Embedding(30, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 5)

    def forward(self, idx):
        h, _ = self.lstm(self.emb(idx))
        return self.out(h)


class GRUClassifier(nn.Module):
    """Two-layer bidirectional GRU; nn.GRU's inter-layer dropout is random in train mode."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(8, 12, num_layers=2, batch_first=True, bidirectional=True, dropout=0.1)
        self.out = nn.Linear(24, 3)

    def forward(self, x):
        h, _ = self.gru(x)
        return self.out(h[:, -1])


class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(16, 4, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(h)


class TorchTransformer(nn.Module):
    """nn.TransformerEncoder with its defaults (dropout 0.1; a fused fast path in eval)."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


class NanoGPT(nn.Module):
    """A nanoGPT-style decoder: causal SDPA with dropout in training, tied head, learned positions."""

    def __init__(self, vocab=64, dim=32, heads=4, layers=2, block=32, dropout=0.1):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({"ln1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim),
                                                   "proj": nn.Linear(dim, dim), "ln2": nn.LayerNorm(dim),
                                                   "fc": nn.Linear(dim, 4 * dim), "out": nn.Linear(4 * dim, dim)})
                                    for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).view(b, t, 3, self.heads, -1).transpose(1, 3).unbind(2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
            x = x + blk["proj"](y.transpose(1, 2).reshape(b, t, -1))
            x = x + blk["out"](F.gelu(blk["fc"](blk["ln2"](x))))
        return self.head(self.ln_f(x))


class TrainBranch(nn.Module):
    """BatchNorm, and an ``if self.training:`` branch that also returns an auxiliary output."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head, self.aux = nn.Linear(8, 5), nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        if self.training:
            return self.head(h), self.aux(h)
        return self.head(h)


class DropoutNoiseBN(nn.Module):
    """Dropout, BatchNorm1d and a custom train-only noise injection."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 4)

    def forward(self, x):
        h = self.bn(self.fc1(x))
        if self.training:
            h = h + 0.05 * torch.randn_like(h)
        return self.fc2(self.drop(torch.relu(h)))


def drop_path(x, drop_prob: float, training: bool):
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPathMLP(nn.Module):
    """Residual MLP blocks with a hand-written drop path (stochastic depth)."""

    def __init__(self, drop_prob=0.1):
        super().__init__()
        self.drop_prob = drop_prob
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
                                    for _ in range(2))
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + drop_path(block(h), self.drop_prob, self.training)
        return self.out(h)


class GroupedDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1)
        self.grouped, self.bn = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)

    def forward(self, x):
        return self.bn(self.grouped(self.pw(self.dw(x)))).mean((2, 3))


class TinyUNet(nn.Module):
    """Down, up (ConvTranspose2d and interpolate), skip concatenation; returns a dict."""

    def __init__(self):
        super().__init__()
        self.down, self.mid = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.fuse, self.norm = nn.Conv2d(16, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        d = F.silu(self.down(x))
        u = F.silu(self.up(F.silu(self.mid(d))))
        h = F.silu(self.norm(self.fuse(torch.cat([u, d], 1))))
        return {"mask": F.interpolate(self.head(h), scale_factor=2.0, mode="bilinear"), "features": h.mean((2, 3))}


def _hand(cls, args, static=None, random_ops=False, seq=None) -> Entry:
    return Entry("research code", lambda: Case(cls(), args, static=static or {}, random_ops=random_ops, seq=seq))


RESEARCH = {
    "hand/functional_raw_params": _hand(FunctionalRaw, (Floats(("B", 8)),)),
    "hand/einsum_params": _hand(EinsumMixer, (Floats(("B", 6, 16)),)),
    "hand/tied_embeddings": _hand(TiedEmbeddings, (Tokens(50),), seq=6),
    "hand/shared_linear_x3": _hand(SharedLinear, (Floats(("B", 8)),)),
    "hand/data_dependent_control_flow": _hand(DataDependent, (Floats(("B", 8)),)),
    "hand/keyword_only_forward": _hand(KeywordOnly, (Floats(("B", 8)),), static={"scale": 3.0}),
    "hand/optional_arg_none": _hand(OptionalMask, (Floats(("B", 5, 8)),)),
    "hand/inplace_ops": _hand(InPlace, (Floats(("B", 8)),)),
    "hand/slice_assign": _hand(SliceAssign, (Floats(("B", 5, 8)),)),
    "hand/lstm": _hand(LSTMTagger, (Tokens(30),), seq=7),
    "hand/gru_bidirectional": _hand(GRUClassifier, (Floats(("B", 7, 8)),), random_ops=True),
    "hand/multihead_attention": _hand(AttentionBlock, (Floats(("B", 5, 16)),)),
    "hand/torch_transformer_encoder": _hand(TorchTransformer, (Floats(("B", 5, 16)),)),
    "hand/nanogpt": _hand(NanoGPT, (Tokens(64),), random_ops=True, seq=8),
    "hand/train_branch_aux_output": _hand(TrainBranch, (Floats(("B", 3, 12, 12)),)),
    "hand/dropout_noise_batchnorm": _hand(DropoutNoiseBN, (Floats(("B", 8)),), random_ops=True),
    "hand/drop_path_mlp": _hand(DropPathMLP, (Floats(("B", 8)),)),
    "hand/grouped_depthwise_conv": _hand(GroupedDepthwise, (Floats(("B", 8, 12, 12)),)),
    "hand/unet_dict_output": _hand(TinyUNet, (Floats(("B", 3, 16, 16)),)),
}
