"""The method section of docs/coverage.md: every check and tolerance, in words."""
from __future__ import annotations

METHOD = """
## Method

**Models.** Random init (torch seed 0 before each build), tiny configs and inputs so that the zoo
runs on two CPU cores; nothing is downloaded. Each model is handed to qzo_fx in the mode its
constructor leaves it (train mode for every family here), with the training recipe's dropout and
drop-path rates (timm), the builders' defaults (torchvision; GoogLeNet keeps its aux classifiers,
Inception-v3's are off because they need 299-pixel inputs) and the configs' defaults other than
sizes (Hugging Face: dropout, `use_cache`, SpecAugment masking). Hugging Face decoders are called
`model(input_ids, attention_mask=mask)`, encoders and encoder-decoders `model(**batch)` with
keywords only; attention masks are right-padded (the last row's final quarter is 0). The example
batch is 2 (token inputs: 8 tokens). The zoo keeps its own deep copy of the model for float
references, so qzo_fx only ever sees the user's object.

**Outputs** are flattened by the zoo's own code (`tests/zoo/outputs.py`): tensors, tuples, lists,
named tuples, dicts, Hugging Face `ModelOutput` and cache objects (their layers' keys and values),
each leaf named by its path. A different structure (a missing output, a ModelOutput that became a
tuple) is a difference.

**Stages** (each a check that can fail; a stage whose input is missing is *not run*):

1. `float_equivalence`: `qzo_fx.prepare(model, QuantConfig(weight=None), example_inputs,
   example_kwargs)` (nothing quantized) against the float model, same inputs. Eval mode
   (`qm.eval()` vs `model.eval()`): every floating output within relative error 1e-5
   (max |a − b| / max |a|), every other output equal, same structure. Train mode (`qm.train()` vs
   `model.train()`, `torch.manual_seed(0)` before each call) the same, for deterministic models only.
   A model is *stochastic* in train mode, and its train mode is not compared, when it has a
   Dropout-family module with p > 0, a module with `drop_prob` > 0 (timm DropPath/DropBlock) or
   torchvision `StochasticDepth` with p > 0, a positive Hugging Face config field that transformers
   applies functionally (`dropout`, `attention_dropout`, `attn_pdrop`, `layerdrop`, …; SpecAugment
   masking when `apply_spec_augment`), random ops declared by the case (hand-written forwards that
   call `torch.randn_like`, `F.scaled_dot_product_attention(dropout_p=…)`, nn.GRU's inter-layer
   dropout), or when two train-mode calls of the float model under seeds 0 and 1 differ.
2. `prepare`: `qzo_fx.prepare(model, QuantConfig(weight_bits=8, activation_bits=8), example_inputs,
   example_kwargs)`, defaults otherwise. Fails on an exception, or when no weight or no activation
   quantizer was inserted.
3. `eval_deterministic`: `qm.eval(); qm(x)` twice gives bit-identical outputs, and no NaN/inf where the
   float model's output is finite.
4. `w8a8_tracks_float`: the W8A8 model in eval mode computes roughly the float model's function on
   the example inputs: every floating output within max-norm relative error 0.5 (max |q − f| /
   max |f|), and not identically zero where the float output is not. A sanity bound, not an
   accuracy target (W8A8 at random init is 0.5–25% off here): it catches a model whose quantizers
   collapse its outputs or compute something else, which every later comparison against `qm` itself
   would pass.
5. `shapes`: batch 3 and batch 1, and for token inputs 11 tokens, in eval and in train mode: every
   output of the prepared model has the shape of the float model's output at the same path. A
   variant the float model itself rejects (BatchNorm in train mode on a batch of 1) is not asked of
   the prepared model.
6. `train_step`: `qm.train()`, `opt = torch.optim.Adam(qm.parameters(), 1e-3)`, a `DataLoader` over 8
   synthetic samples in batches of 3 (3, 3, 2: the last batch is smaller), the loss the mean squared
   error of every floating output against a fixed N(0, 1) target of its shape, and per batch
   `opt.zero_grad(); step(batch); opt.step()` with `step = qzo_fx.train_step(qm, loss_fn, qzo_fx.STE())`,
   then the same epoch with `qzo_fx.FOGZO(total_steps=3, seed=0)` and a fresh Adam (default strategy,
   default `on_nonfinite`). After each step every `.grad` must be finite (unless the step counted a
   non-finite skip the user can see); on the first step of each estimator some `.grad` must be
   non-zero when the float model, same loss and batch, gets a non-zero gradient; after `opt.step()`
   every parameter must be finite. Any exception fails the stage.
7. `export`: `qm.eval()`, then `qzo_fx.export_onnx(qm, example_inputs, path)` with defaults
   (`example_kwargs=` when the model takes keywords). When training failed, a freshly prepared model is
   exported so that export is still measured.
8. `onnxruntime`: `onnxruntime.InferenceSession(path)` with no options and no providers (what a CPU user
   gets: all graph optimizations, CPUExecutionProvider) against `qm.eval()` on the same inputs: the
   example batch, batch 3 when the file's batch axis is dynamic, 11 tokens when its sequence axis is.
   An exception while loading or running the file counts as a wrong result (the file is broken for
   that input). Every floating output must be within **1 output step**, where an output step is max |torch output| /
   127: one step of an 8-bit symmetric grid over that output's range (1e-6 absolute floor for outputs
   that are all ~0). Why this unit: no quantizer sits on a model's output, so the output's own 8-bit
   resolution is the finest difference a W8A8 pipeline can claim; float-kernel differences between
   torch and ONNX Runtime are ~1e-6 of the range, five orders below it; a wrong scale, zero point,
   folded BatchNorm or a saturating integer kernel moves outputs by several steps. A random-init deep
   network can also move by more than a step when one activation lands within float noise of a
   rounding boundary (a tie) and the two runtimes pick neighbouring codes: that is counted as the
   failure a user sees, and the next stage says whether the file itself is right. The *torch jitter*
   column measures that sensitivity without any runtime: the distance between `qm.eval()`'s outputs
   for the example inputs and for the same float inputs scaled by 1 + 2^-20 (float-noise-sized).
   Where it is above one step, one-step parity is out of reach for any runtime on that random-init
   model; the verdict is not relaxed for it, the column says why it failed. Such a model's verdict can
   also change with torch's thread count (another summation order is another float-noise-sized
   change): the run's thread setting is in the header.
9. `onnx_reference`: the same inputs in `onnx.reference.ReferenceEvaluator` (the ONNX spec's
   operators in numpy) against `qm.eval()`, within 1 output step: is the file right? The table also
   gives ORT against the reference: does the runtime deviate from the file? Three kernels are
   registered in the evaluator: DequantizeLinear/QuantizeLinear for opsets < 19 use its opset-19
   kernels (the same function for int8/uint8); GatherElements and MaxPool are implemented directly
   from the spec (onnx 1.23's kernels fail on some valid 2-D GatherElements inputs, and give a too
   large MaxPool output with pads and `ceil_mode`: 10×10 for 8×8, kernel 3, stride 1, pad 1).
   *Skipped* (–) only when the evaluator itself raises on the file (reason in the log) or the file
   has more than 4000 nodes or 64 MiB; a skipped reference check does not stop a model from counting
   end to end, and the skips are counted in the stage table.
10. `user_model_untouched`: after every stage, the model passed in has the same module tree, modes,
    hooks and attributes per module, every parameter and buffer bit-identical, the same
   `requires_grad` and `.grad` state, and the same tied parameters.

`qzo_fx.verify_onnx(qm, path, inputs)` is called after stage 8, at the input set ORT deviated most
on, and what it says is listed separately; the zoo's verdicts never use it. It follows ORT's choice
at each rounding tie, so it tells a file that computes the model's function, where a float-noise
difference at a tie grows into the deviation, from a file that computes something else.

**Failure kinds.** *QzoError*: qzo_fx raised one of its own errors. *raw exception*: anything else
escaped (torch, ONNX Runtime, a bug). *wrong result*: nothing was raised and a check found a wrong
or missing result (the worst kind: the user is not told). *timeout*: the model ran past its budget.
End to end means every stage passed.

**Run it**: `python -m tests.zoo.report --log zoo_run.txt` (all models, rewrites this file);
`pytest -m zoo` (one test per model; a failing model is a failed test); `pytest -m zoo_smoke` (five
fast, diverse models, for CI).
"""
