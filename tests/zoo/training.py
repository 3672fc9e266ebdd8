"""Stage 5: a user's training loop over a DataLoader, with the STE and then with FOGZO."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import qzo_fx
from qzo_fx.capture.copying import copy_model
from tests.zoo.cases import Case
from tests.zoo.outputs import loss_of
from tests.zoo.results import CheckFailed, ZooBug, first_line

LR = 1e-3


def loader_of(case: Case) -> tuple[DataLoader, list[str]]:
    """A tiny synthetic dataset in batches of ``batch + 1`` whose last batch is smaller
    (``batch``): e.g. 8 samples in batches of 3, 3, 2. Returns the loader and the keyword names
    of the columns after the positional ones."""
    size = case.batch + 1
    args, kwargs = case.inputs(batch=2 * size + case.batch, seed=1)
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    dataset = TensorDataset(*args, *(kwargs[k] for k in names))
    return DataLoader(dataset, batch_size=size, shuffle=False), names


def float_has_gradient(float_model: nn.Module, loss_fn, batch) -> bool:
    """Whether the float model, in train mode, gets a non-zero gradient on ``batch``."""
    model = copy_model(float_model).train()
    torch.manual_seed(0)
    try:
        loss_fn(model, batch).backward()
    except Exception as error:
        raise ZooBug(f"the float model itself does not train on this batch: {first_line(error)}") from error
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def train(qm: nn.Module, float_model: nn.Module, case: Case, info: dict) -> str:
    loader, names = loader_of(case)
    positional, static = len(case.args), case.static

    def loss_fn(model, batch):
        args, kwargs = batch
        return loss_of(model(*args, **kwargs, **static))

    def unpack(columns):
        return tuple(columns[:positional]), dict(zip(names, columns[positional:]))

    expect_gradient = float_has_gradient(float_model, loss_fn, unpack(next(iter(loader))))

    losses = {}
    estimators = (("STE", qzo_fx.STE()), ("FOGZO", qzo_fx.FOGZO(total_steps=len(loader), seed=0)))
    for label, estimator in estimators:
        qm.train()
        opt = torch.optim.Adam(qm.parameters(), LR)
        step = qzo_fx.train_step(qm, loss_fn, estimator)
        losses[label] = []
        for i, columns in enumerate(loader):
            batch = unpack(columns)
            where = f"{label} step {i} (batch {len(columns[0])})"
            opt.zero_grad()
            skips = step.stats.nonfinite_skips
            try:
                loss = step(batch)
            except Exception as error:
                error.zoo_context = where
                raise
            if step.stats.nonfinite_skips == skips:  # a skip the user can see is allowed
                _check_gradients(qm, where, expect_gradient and i == 0)
            opt.step()
            _check_parameters(qm, where)
            losses[label].append(float(loss))
        strategy = getattr(getattr(step, "stats", None), "strategy", None)
        if strategy:
            info[f"{label.lower()}_strategy"] = strategy
    info["losses"] = losses
    return "; ".join(f"{k} losses " + " ".join(f"{v:.3g}" for v in vals) for k, vals in losses.items())


def _check_gradients(qm: nn.Module, where: str, expect_nonzero: bool) -> None:
    """Every .grad finite; on a first step where the float model gets a non-zero gradient, some
    .grad non-zero too (later steps may legitimately saturate, e.g. a final ReLU)."""
    grads = [(n, p.grad) for n, p in qm.named_parameters() if p.grad is not None]
    bad = [n for n, g in grads if not torch.isfinite(g).all()]
    if bad:
        raise CheckFailed(f"{where}: non-finite .grad in {len(bad)} parameters ({', '.join(bad[:3])}), "
                          "no error raised and no skip counted")
    if expect_nonzero and not any(bool(g.abs().sum() > 0) for _, g in grads):
        raise CheckFailed(f"{where}: no parameter received a non-zero gradient ({len(grads)} .grad tensors set), "
                          "while the float model gets one on this batch")


def _check_parameters(qm: nn.Module, where: str) -> None:
    bad = [n for n, p in qm.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise CheckFailed(f"{where}: after opt.step(), non-finite values in {len(bad)} parameters "
                          f"({', '.join(bad[:3])})")
