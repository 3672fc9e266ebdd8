"""A training step's own state in a checkpoint: resuming follows the same trajectory bit for bit.

Saved beside the model and optimizer: the schedule position, the seed, the counters, the strategy
``auto`` settled on (and its timings), the torch RNG state and the first batch's signature.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from qzo_fx.errors import TrainStepError
from qzo_fx.train.stats import StepStats
from qzo_fx.train.strategies import Auto

__all__ = ["step_state", "restore_step_state"]


def _describe(estimator: Any) -> str:
    """The estimator's settings without its seed (a checkpoint restores the seed itself)."""
    fields = dataclasses.fields(estimator) if dataclasses.is_dataclass(estimator) else ()
    return repr(dataclasses.replace(estimator, seed=None)) if any(f.name == "seed" for f in fields) else repr(estimator)


def step_state(step: Any) -> dict[str, Any]:
    auto = step.strategy if isinstance(step.strategy, Auto) else None
    return {"step_index": step.step_index, "base_seed": step.base_seed, "stats": dataclasses.asdict(step.stats),
            "estimator": _describe(step.estimator), "torch_rng": torch.get_rng_state(),
            "strategy": None if step.strategy is None else step.strategy.chosen,
            "timings": None if auto is None else auto.timings, "batch_signature": step._batches.signature,
            "batch_shapes": step._batches.shapes}


def restore_step_state(step: Any, state: dict[str, Any]) -> None:
    if state.get("estimator") != _describe(step.estimator):
        raise TrainStepError(f"checkpoint was written for {state.get('estimator')}, this step uses "
                             f"{_describe(step.estimator)}; build the step with the same estimator to resume.")
    step.step_index, step.base_seed = state["step_index"], state["base_seed"]
    step.stats = StepStats(**state["stats"])
    step._batches.signature = state.get("batch_signature")
    step._batches.shapes = state.get("batch_shapes")
    torch.set_rng_state(state["torch_rng"])
    strategy = step.strategy
    if isinstance(strategy, Auto) and state.get("timings") is not None:
        strategy.timings = {k: list(v) for k, v in state["timings"].items() if k in strategy.candidates}
        strategy.settled = state["strategy"] if state["strategy"] in strategy.candidates else None
