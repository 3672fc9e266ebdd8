"""Research code's layers that training and export must carry as they are: an encoder with
BatchNorm shared by two views, a zero-initialised head with a non-zero bias, the hook-based
weight_norm / spectral_norm, a codebook lookup by ``torch.cdist``, and a decoder loop over the
target length. Each was a silent wrong answer or a raw error once; the unit tests that pin them
use these classes too."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.zoo.cases import Case, Entry, Floats, Tokens


class SharedEncoder(nn.Module):
    """One conv + BatchNorm called on two views (SimCLR), and one conv before two BatchNorms (a
    BatchNorm per domain): sites that share a weight, with one BatchNorm or with two."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.shared_conv, self.bn_a, self.bn_b = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, a, b):
        za, zb = F.relu(self.bn(self.conv(a))), F.relu(self.bn(self.conv(b)))
        return self.bn_a(self.shared_conv(za)) - self.bn_b(self.shared_conv(zb))


class SpatialTransformer(nn.Module):
    """A spatial transformer: its localisation head starts at zero weights and the identity as bias."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 8),
                                      nn.ReLU())
        self.theta = nn.Linear(8, 6)
        with torch.no_grad():  # the usual start: the identity transform
            self.theta.weight.zero_()
            self.theta.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))
        self.classify = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(4, 3))

    def forward(self, x):
        theta = self.theta(self.features(x)).view(-1, 2, 3)
        return self.classify(F.grid_sample(x, F.affine_grid(theta, x.size(), align_corners=False),
                                           align_corners=False)), theta


class Chomp(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        return x[:, :, :-self.size].contiguous()


class TemporalConvNet(nn.Module):
    """A TCN block as research code writes it: causal dilated convs under weight_norm, a
    spectral-normalized head."""

    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the hook-based forms are deprecated
            self.net = nn.Sequential(nn.utils.weight_norm(nn.Conv1d(4, 8, 3, padding=2)), Chomp(2), nn.ReLU(),
                                     nn.utils.weight_norm(nn.Conv1d(8, 8, 3, padding=4, dilation=2)), Chomp(4),
                                     nn.ReLU())
            self.head = nn.utils.spectral_norm(nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.net(x)[:, :, -1])


class CodebookLookup(nn.Module):
    """A VQ layer: nearest codebook entry by ``torch.cdist``, straight-through to the decoder."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.enc, self.codebook, self.dec = p, nn.Linear(8, 4), nn.Embedding(16, 4), nn.Linear(4, 8)

    def forward(self, x):
        z = self.enc(x)
        distances = torch.cdist(z, self.codebook.weight, p=self.p)
        nearest = self.codebook(distances.argmin(-1))
        return self.dec(z + (nearest - z).detach()), distances


class TeacherForcedDecoder(nn.Module):
    """Research code's decoder loop: one step per target token, in Python. Symbolic tracing cannot
    iterate over a traced size, and torch.export unrolls the example's steps."""

    def __init__(self):
        super().__init__()
        self.emb, self.cell, self.out = nn.Embedding(20, 8), nn.GRUCell(8, 16), nn.Linear(16, 20)

    def forward(self, tgt):
        h, steps = tgt.new_zeros(tgt.shape[0], 16, dtype=torch.float32), []
        for t in range(tgt.size(1)):
            h = self.cell(self.emb(tgt[:, t]), h)
            steps.append(self.out(h))
        return torch.stack(steps, 1)


def _entry(build, args, seq=None) -> Entry:
    return Entry("research code", lambda: Case(build(), args, seq=seq))


RESEARCH_LAYERS = {
    "hand/shared_encoder_batchnorm": _entry(SharedEncoder, (Floats(("B", 3, 12, 12)), Floats(("B", 3, 12, 12)))),
    "hand/spatial_transformer_zero_init": _entry(SpatialTransformer, (Floats(("B", 1, 16, 16)),)),
    "hand/tcn_hook_weight_norm": _entry(TemporalConvNet, (Floats(("B", 4, 16)),)),
    "hand/vq_codebook_cdist": _entry(lambda: CodebookLookup(2.0), (Floats(("B", 5, 8)),)),
    "hand/decoder_loop": _entry(TeacherForcedDecoder, (Tokens(20),), seq=5),
}
