"""``QzoTrainer``: a ``transformers.Trainer`` whose training step is qzo_fx's step for an estimator.

Everything else is the Trainer's own: data loading and collation, the optimizer and scheduler,
gradient clipping, logging, evaluation, ``save_steps`` checkpoints and ``resume_from_checkpoint``.
The step writes its gradient estimate into ``.grad`` and the Trainer's optimizer steps on it::

    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=4), example_inputs=(ids,),
                        example_kwargs={"labels": ids})
    trainer = QzoTrainer(model=qm, args=TrainingArguments("out", use_cpu=True, report_to=[]),
                         train_dataset=dataset, estimator=qzo_fx.FOGZO(total_steps=100))
    trainer.train()

The loss is the model's own (``outputs.loss``: prepare the model with ``labels`` among its example
inputs, as a Hugging Face model computes its loss when given labels), or ``compute_loss_func``.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from transformers import Trainer

from qzo_fx import STE, ZOQO, TrainStep, TrainStepError, train_step

__all__ = ["QzoTrainer", "STEP_STATE_NAME"]

# The training step's own state (schedule position, seed, strategy), beside the Trainer's files.
STEP_STATE_NAME = "qzo_step.pt"


class QzoTrainer(Trainer):
    """A ``transformers.Trainer`` that trains a prepared model with a qzo_fx estimator.

    Args:
        model: a prepared model (``qzo_fx.prepare``); the other arguments are the Trainer's.
        estimator: ``qzo_fx.STE()`` (default), ``FOGZO(...)``, ``NSPSA(...)``, ``ZOSign(...)`` or
            ``ZOQO(...)`` (on a model switched to integer codes; it moves the codes itself, so
            the Trainer's optimizer has nothing to update and gradient accumulation is refused).
        strategy, on_nonfinite: passed to :func:`qzo_fx.train_step`.

    With ``gradient_accumulation_steps = k`` the estimates of the k micro-batches are averaged, as
    the STE gradients of a scaled loss would be. ``logs`` gain ``qzo_beta`` (FOGZO) and
    ``qzo_fwd_equivalents`` (compute so far in forward passes; backward = 2).

    Example:
        >>> from transformers import TrainingArguments
        >>> # trainer = QzoTrainer(model=qm, args=TrainingArguments("out", use_cpu=True, report_to=[]),
        >>> #                      train_dataset=data, estimator=qzo_fx.FOGZO(total_steps=100))
    """

    def __init__(self, model: Optional[nn.Module] = None, args: Any = None, *, estimator: Any = None,
                 strategy: str = "auto", on_nonfinite: str = "raise", **kwargs: Any) -> None:
        super().__init__(model=model, args=args, **kwargs)
        self.estimator = STE() if estimator is None else estimator
        self.qzo_strategy, self.qzo_on_nonfinite = strategy, on_nonfinite
        self.qzo_step: Optional[TrainStep] = None
        self._qzo_resumed: Optional[dict[str, Any]] = None
        self._qzo_micro = 0
        self._labels: Optional[torch.Tensor] = None
        if isinstance(self.estimator, ZOQO) and self.args.gradient_accumulation_steps > 1:
            raise TrainStepError("ZOQO moves integer codes in its own step, so it cannot accumulate gradients: "
                                 "set gradient_accumulation_steps=1.")

    # ------------------------------------------------------------------ the step
    def _step_for(self, model: nn.Module) -> TrainStep:
        if self.qzo_step is None:
            self.qzo_step = train_step(model, self._loss_of, self.estimator, strategy=self.qzo_strategy,
                                       on_nonfinite=self.qzo_on_nonfinite)
            if self._qzo_resumed is not None:
                self.qzo_step.load_state_dict(self._qzo_resumed)
                self._qzo_resumed = None
        return self.qzo_step

    def _loss_of(self, model: Callable[..., Any], inputs: dict[str, Any]) -> torch.Tensor:
        outputs = model(**inputs)
        loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
        if loss is None and self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, self._labels, num_items_in_batch=None)
        if loss is None:
            raise TrainStepError("the prepared model returned no loss: prepare it with labels among its example "
                                 "inputs (example_kwargs={'labels': ...}) so it computes its own, or pass "
                                 "compute_loss_func=... to QzoTrainer.")
        return loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Optional[Any] = None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._labels = inputs.get("labels")
        prepared = getattr(model, "module", model)  # through a DDP wrapper
        accepted = _accepted_inputs(prepared)
        batch = {k: v for k, v in inputs.items() if accepted is None or k in accepted}
        if self.compute_loss_func is not None and accepted is not None and "labels" not in accepted:
            batch.pop("labels", None)
        _refuse_uncaptured_inputs(prepared, inputs, batch, self.compute_loss_func is not None)
        step = self._step_for(model)
        micro_steps = max(int(getattr(self, "current_gradient_accumulation_steps", 1)), 1)
        loss = step(batch)  # adds this micro-batch's estimate to .grad, as backward would
        self._qzo_micro = (self._qzo_micro + 1) % micro_steps
        if self._qzo_micro == 0 and micro_steps > 1:
            # The last micro-batch: the mean of the k estimates, as the STE gradients of the
            # k losses scaled by 1/k would be (the optimizer steps next).
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.div_(micro_steps)
        return loss.detach() / micro_steps

    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer keeps the dataset columns the model's forward takes. The prepared forward
        # takes only what prepare's examples had, so the user model's own inputs are kept too:
        # training_step then refuses the ones the graph cannot take instead of losing them.
        super()._set_signature_columns_if_needed()
        report = getattr(self.model, "meta", {}).get("qzo.capture")
        columns: list[str] = list(self._signature_columns or [])
        extra = [n for n in getattr(report, "model_inputs", ()) if n not in columns]
        self._signature_columns = columns + extra  # type: ignore[assignment]  # the Trainer declares it None

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.qzo_step is not None and "loss" in logs:
            stats = self.qzo_step.stats
            if stats.beta is not None:
                logs["qzo_beta"] = stats.beta
            logs["qzo_fwd_equivalents"] = stats.fwd_equivalents
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        # Tied weights are one tensor under two names, which safetensors refuses: save each once.
        if state_dict is None and self.args.should_save and self.model is not None:
            state_dict = _untied(self.model.state_dict())
        super()._save(output_dir, state_dict)
        config: Any = getattr(self.model, "config", None)
        if self.args.should_save and hasattr(config, "save_pretrained"):
            # Beside the weights, as a PreTrainedModel saves: the trained weights then load into the
            # model's own class (from_pretrained; the quantizer keys are reported unused).
            config.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.qzo_step is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            torch.save(self.qzo_step.state_dict(), os.path.join(folder, STEP_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STEP_STATE_NAME)
        if os.path.isfile(path):
            state = torch.load(path, weights_only=False)
            if self.qzo_step is None:
                self._qzo_resumed = state
            else:
                self.qzo_step.load_state_dict(state)


def _accepted_inputs(model: nn.Module) -> Optional[set[str]]:
    """Names the prepared model's forward takes (None where it takes any keyword)."""
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def _refuse_uncaptured_inputs(prepared: nn.Module, inputs: dict[str, Any], batch: dict[str, Any],
                              loss_outside: bool) -> None:
    """A batch key the user's model takes but the prepared graph was not captured with (an
    ``attention_mask`` from a padding collator) would be dropped, and the model would train as if
    the batch were unpadded. Keys the model never takes (extra dataset columns) are dropped."""
    report = getattr(prepared, "meta", {}).get("qzo.capture")
    model_inputs = set(getattr(report, "model_inputs", ()))
    lost = [k for k, v in inputs.items() if k not in batch and k in model_inputs and v is not None
            and not (k == "labels" and loss_outside)]
    if lost:
        raise TrainStepError(f"the batch has {lost}, which {type(prepared).__name__}'s forward takes but the prepared "
                             "model was not captured with, so it would be ignored. Prepare the model with them among "
                             f"its example inputs (example_kwargs={{{', '.join(repr(k) + ': ...' for k in lost)}}}), "
                             "or leave them out of the batches.")


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[tuple] = set()
    out = {}
    for key, value in state.items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if value.numel() and identity in seen:
            continue
        seen.add(identity)
        out[key] = value.contiguous()
    return out
