"""Quantization-aware training with FOGZO under Hugging Face Accelerate.

Single process:            python examples/accelerate_qat.py
Two CPU processes (DDP):   accelerate launch --cpu --num_processes 2 examples/accelerate_qat.py
                           (or torchrun --standalone --nproc_per_node 2 examples/accelerate_qat.py)

Accelerate wraps the prepared model (DistributedDataParallel with several processes), the
optimizer and the data loader; qzo_fx's step takes the wrapped model as it is: the STE gradient
is all-reduced by the wrapper's backward, every rank draws the same perturbation, and the
branch losses are averaged over ranks before the estimate is written to ``.grad``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator

import qzo_fx
from qzo_fx.data import load_digits
from qzo_fx.models import MLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weight-bits", type=int, default=2)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)  # the same initial weights on every process
    data = load_digits()
    train = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True)
    model = MLP((64, 64, 10))
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=args.weight_bits), example_inputs=(data.x_train[:8],))
    opt = torch.optim.AdamW(qm.parameters(), lr=3e-3)
    qm, opt, loader = accelerator.prepare(qm, opt, loader)

    steps = args.epochs * len(loader)
    step = qzo_fx.train_step(qm, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                             qzo_fx.FOGZO(beta_min=0.999, total_steps=steps, seed=0))
    qm.train()
    for epoch in range(args.epochs):
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss = step(batch)
            opt.step()
        accelerator.print(f"epoch {epoch}: loss {float(loss):.4f}, beta {step.stats.beta:.5f}")

    net = accelerator.unwrap_model(qm).eval()
    with torch.no_grad():
        accuracy = (net(data.x_test).argmax(1) == data.y_test).float().mean().item()
    accelerator.print(f"test accuracy {accuracy:.3f} ({accelerator.num_processes} process(es), "
                      f"{step.stats.fwd_equivalents} forward-pass equivalents on this one)")


if __name__ == "__main__":
    main()
