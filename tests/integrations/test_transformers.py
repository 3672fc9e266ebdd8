"""QzoTrainer: a transformers.Trainer that trains a prepared model with a qzo_fx estimator."""
from __future__ import annotations

import pytest
import torch

import qzo_fx

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from qzo_fx.integrations.transformers import STEP_STATE_NAME, QzoTrainer  # noqa: E402

VOCAB, LENGTH = 64, 16


class Tokens(torch.utils.data.Dataset):
    """Next-token data with a learnable pattern: each sequence counts up from a random start."""

    def __init__(self, n: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (starts + torch.arange(LENGTH)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _prepared(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = Tokens(2).ids
    return qzo_fx.prepare(transformers.LlamaForCausalLM(cfg), qzo_fx.QuantConfig(weight_bits=4),
                          example_inputs=(ids,), example_kwargs={"labels": ids})


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                    max_steps=4, learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0,
                    disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant")
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("estimator", [qzo_fx.STE(), qzo_fx.FOGZO(total_steps=4, seed=0)], ids=["ste", "fogzo"])
def test_trains_and_logs_compute(tmp_path, estimator):
    qm = _prepared()
    before = _params(qm)
    trainer = QzoTrainer(model=qm, args=_args(tmp_path), train_dataset=Tokens(), estimator=estimator)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 4 and all(torch.isfinite(torch.tensor(row["loss"])) for row in logged)
    per_step = estimator.fwd_equivalents
    assert logged[-1]["qzo_fwd_equivalents"] == 4 * per_step
    assert ("qzo_beta" in logged[-1]) == isinstance(estimator, qzo_fx.FOGZO)
    assert any(not torch.equal(before[k], v) for k, v in _params(qm).items())


def test_gradient_accumulation_averages_micro_batches(tmp_path):
    # STE on a mean loss: two micro-batches of 2 give the gradient of one batch of 4.
    whole, split = _prepared(), _prepared()
    QzoTrainer(model=whole, args=_args(tmp_path / "a", max_steps=1, learning_rate=1e-2, optim="sgd"),
               train_dataset=Tokens(4)).train()
    QzoTrainer(model=split, args=_args(tmp_path / "b", max_steps=1, learning_rate=1e-2, optim="sgd",
                                       per_device_train_batch_size=2, gradient_accumulation_steps=2),
               train_dataset=Tokens(4)).train()
    for key, value in _params(whole).items():
        torch.testing.assert_close(_params(split)[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_checkpoint_loads_into_a_fresh_prepare_and_resume_is_bit_exact(tmp_path):
    estimator = qzo_fx.FOGZO(total_steps=4, seed=3)
    straight = _prepared()
    QzoTrainer(model=straight, args=_args(tmp_path / "straight"), train_dataset=Tokens(), estimator=estimator).train()

    first = _prepared()
    QzoTrainer(model=first, args=_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2),
               train_dataset=Tokens(), estimator=estimator).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / STEP_STATE_NAME).is_file()

    from safetensors.torch import load_file
    fresh = _prepared(seed=1)
    fresh.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    ids = Tokens(3, seed=5).ids
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids, labels=ids).logits, first.eval()(ids, labels=ids).logits)

    resumed = _prepared(seed=2)
    QzoTrainer(model=resumed, args=_args(tmp_path / "run"), train_dataset=Tokens(),
               estimator=estimator).train(resume_from_checkpoint=str(checkpoint))
    for key, value in _params(straight).items():
        assert torch.equal(_params(resumed)[key], value), key


def test_zoqo_refuses_gradient_accumulation(tmp_path):
    qm = qzo_fx.to_integer_codes(_prepared())
    with pytest.raises(qzo_fx.TrainStepError, match="gradient_accumulation_steps"):
        QzoTrainer(model=qm, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=Tokens(),
                   estimator=qzo_fx.ZOQO())


class PaddedTokens(Tokens):
    """Right-padded sequences, as a padding collator gives them: the mask decides the loss."""

    def __getitem__(self, i):
        keep = 6 + i % 8
        mask = (torch.arange(LENGTH) < keep).long()
        ids = torch.where(mask.bool(), self.ids[i], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


def test_a_mask_the_graph_was_not_captured_with_is_refused_not_dropped(tmp_path):
    qm = _prepared()  # prepared from input_ids and labels only
    trainer = QzoTrainer(model=qm, args=_args(tmp_path, max_steps=1), train_dataset=PaddedTokens())
    with pytest.raises(qzo_fx.TrainStepError, match="attention_mask"):
        trainer.train()
    with pytest.raises(qzo_fx.InputError, match="attention_mask"):
        qm(**{k: v[None] for k, v in PaddedTokens()[0].items()})


def test_a_captured_mask_gives_the_float_models_masked_loss(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    data = PaddedTokens(4)
    example = {k: torch.stack([data[i][k] for i in range(2)]) for k in ("input_ids", "attention_mask", "labels")}
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=None), example_inputs=(example["input_ids"],),
                        example_kwargs={"attention_mask": example["attention_mask"], "labels": example["labels"]})
    trainer = QzoTrainer(model=qm, args=_args(tmp_path, max_steps=1), train_dataset=data)
    batch = {k: torch.stack([data[i][k] for i in (2, 3)]) for k in ("input_ids", "attention_mask", "labels")}
    loss = trainer.training_step(qm, dict(batch))
    model.train()
    expected = model(**batch).loss
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)


def test_saved_weights_load_into_the_models_own_class(tmp_path):
    qm = _prepared()
    trainer = QzoTrainer(model=qm, args=_args(tmp_path, max_steps=2), train_dataset=Tokens())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "final"))
    trained = {k: v for k, v in qm.state_dict().items() if not k.startswith("qzo_quant.")}
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[key]), key
