"""Run the whole zoo and regenerate docs/coverage.md (and a per-model log).

    python -m tests.zoo.report [--jobs 2] [--only NAME ...] [--out docs/coverage.md] [--log zoo_run.txt]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import time
from collections import Counter
from pathlib import Path

import torch

from tests.zoo.method import METHOD
from tests.zoo.models import FAMILIES, ZOO, torchvision_shim
from tests.zoo.pipeline import BUDGET_S, run_pipeline
from tests.zoo.results import STAGES, ZooResult

MARK = {"pass": "✓", "fail": "✗", "skip": "–", "not run": "·"}
SHORT = {"float_equivalence": "float eq", "prepare": "prepare", "eval_deterministic": "eval det",
         "w8a8_tracks_float": "W8A8≈float",
         "shapes": "shapes", "train_step": "train", "export": "export", "onnxruntime": "ORT",
         "onnx_reference": "ONNX ref", "user_model_untouched": "untouched"}


def _cell(text: str, width: int = 170) -> str:
    """One table cell: one line, no pipes, paths relative to the working directory, at most ``width``."""
    text = " ".join(str(text).split()).replace("|", "/").replace(f"{Path.cwd()}/", "")
    return text if len(text) <= width else text[: width - 1] + "…"


def _steps(info: dict, key: str) -> str:
    value = info.get(key)
    return "-" if value is None else "inf" if value == float("inf") else f"{value:.2f}"


def _first_failure(result: ZooResult) -> str:
    for name in result.failed():
        stage = result.stages[name]
        return f"{SHORT[name]} ({stage.kind}): {stage.error}"
    return ""


def _summary(results: list[ZooResult]) -> list[str]:
    n = len(results)
    e2e = sum(r.end_to_end for r in results)
    lines = [f"**End to end (every stage passed): {e2e}/{n}.** "
             f"Float equivalence (prepare with nothing quantized equals the float model): "
             f"{sum(r.stages['float_equivalence'].ok for r in results)}/{n}.", "",
             "| stage | passed | failed | not run (an earlier stage failed) | skipped |", "|---|---|---|---|---|"]
    for stage in STAGES:
        count = Counter(r.stages[stage].status for r in results)
        lines.append(f"| {stage} | {count['pass']} | {count['fail']} | {count['not run']} | {count['skip']} |")
    lines += ["", "| family | models | end to end | float eq | prepare | train | export | ORT | ONNX ref |",
              "|---|---|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        rows = [r for r in results if r.family == family]
        if rows:
            cols = [sum(r.stages[s].ok for r in rows) for s in ("float_equivalence", "prepare", "train_step",
                                                                  "export", "onnxruntime", "onnx_reference")]
            lines.append(f"| {family} | {len(rows)} | {sum(r.end_to_end for r in rows)} | "
                         + " | ".join(map(str, cols)) + " |")
    kinds = Counter(r.stages[s].kind for r in results for s in r.failed())
    lines += ["", "Failures by kind (stage failures over all models): "
              + ", ".join(f"{k}: {v}" for k, v in kinds.most_common()) + ". A *raw exception* is one that is "
              "not a `QzoError`; a *wrong result* raised nothing: the zoo's own check found it.", ""]
    return lines


def _table(results: list[ZooResult]) -> list[str]:
    head = ("| model | family | s | CPU s | capture | " + " | ".join(SHORT[s] for s in STAGES)
            + " | ORT vs torch | ref vs torch | ORT vs ref | torch jitter | first failure |")
    lines = [head, "|" + "---|" * (len(STAGES) + 10)]
    for r in results:
        cells = [r.name, r.family, f"{r.seconds:.0f}", f"{r.cpu_seconds:.0f}", r.info.get("capture", "-")]
        cells += [MARK[r.stages[s].status] for s in STAGES]
        cells += [_steps(r.info, k) for k in ("ort_steps", "ref_steps", "ort_ref_steps", "jitter_steps")]
        lines.append("| " + " | ".join(cells + [_cell(_first_failure(r))]) + " |")
    return lines


def _verify_rows(results: list[ZooResult]) -> list[str]:
    lines = ["| model | zoo's ORT verdict | qzo_fx.verify_onnx | what it says |", "|---|---|---|---|"]
    for r in results:
        v = r.info.get("verify")
        if v is None:
            continue
        ours = MARK[r.stages["onnxruntime"].status]
        if "error" in v:
            lines.append(f"| {r.name} | {ours} | raised | {_cell(v['error'], 160)} |")
        else:
            lines.append(f"| {r.name} | {ours} | {'OK' if v['ok'] else 'FAILED'} | {_cell(v['says'], 160)} |")
    return lines


def write_log(results: list[ZooResult], path: Path) -> None:
    """Every stage of every model: status, seconds, error, note, and the model's info."""
    out = []
    for r in results:
        out.append(f"== {r.name} [{r.family}] {r.seconds:.1f} s wall, {r.cpu_seconds:.1f} s CPU, end to end: "
                   f"{'yes' if r.end_to_end else 'no'}")
        for name, s in r.stages.items():
            out.append(f"   {name:21s} {s.status:7s} {s.seconds:6.1f}s {s.kind:13s} {s.error} | {s.note}")
            out += [f"      warned: {w}" for w in s.warnings]
        info = {k: v for k, v in r.info.items()}
        out.append("   info: " + json.dumps(info, default=str))
        for name, s in r.stages.items():
            if s.trace and s.kind == "raw exception":
                out.append(f"   traceback ({name}):\n      " + "\n      ".join(s.trace.strip().splitlines()[-12:]))
    path.write_text("\n".join(out) + "\n")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return Path("COMMIT").read_text().strip() if Path("COMMIT").exists() else "?"


def render(results: list[ZooResult], seconds: float, jobs: int = 1) -> str:
    torchvision_shim()  # timm and transformers import torchvision
    versions = {m: importlib.import_module(m).__version__ for m in ("timm", "transformers", "onnx", "onnxruntime")
                if importlib.util.find_spec(m)}
    lines = ["# Model-zoo coverage", "",
             f"Generated by `python -m tests.zoo.report` on {time.strftime('%Y-%m-%d')} against qzo_fx at commit "
             f"{_commit()} ({platform.machine()}, {os.cpu_count()} CPUs, "
             + (f"{jobs} models at once, one thread each" if jobs > 1 else f"{torch.get_num_threads()} threads")
             + f", torch {torch.__version__}, "
             + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {seconds / 60:.1f} min wall clock and "
             f"{sum(r.cpu_seconds for r in results) / 60:.1f} min of CPU time for {len(results)} models, "
             f"budget {BUDGET_S} s wall clock per model).", "",
             "Each model is built as a user builds it (random init, tiny config, the recipe's dropout and "
             "drop path) and goes through what a user's script calls; every stage is a check that can fail. "
             "The checks and tolerances are stated under *Method* below.", ""]
    lines += _summary(results)
    lines += ["Marks: ✓ passed, ✗ failed, · not run (an earlier stage it needs failed), – skipped (reason in the "
              "log). *s* / *CPU s*: wall-clock and CPU seconds (all threads) for the model. Distances are max over "
              "outputs and input sets, in output steps; *torch jitter*: how far `qm.eval()` itself moves when its "
              "float inputs are scaled by 1 + 2^-20 (see Method, stage 8).", ""]
    lines += _table(results)
    lines += ["", "## What qzo_fx.verify_onnx says (recorded, never used for a verdict)", ""] + _verify_rows(results)
    lines += ["", METHOD.strip(), ""]
    return "\n".join(lines)


def _run_one(name: str) -> ZooResult:
    torchvision_shim()  # before anything imports torchvision
    return run_pipeline(name, ZOO[name])


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per worker: --jobs 2 on two cores
    torchvision_shim()


def _progress(result: ZooResult) -> None:
    timing = " ".join(f"{SHORT[k]} {v.seconds:.0f}" for k, v in result.stages.items() if v.seconds >= 0.5)
    print(f"{'OK ' if result.end_to_end else 'BAD'} {result.name} ({result.seconds:.0f} s wall, "
          f"{result.cpu_seconds:.0f} s CPU: {timing}) {_first_failure(result)}", flush=True)


def run_all(names: list[str], jobs: int) -> list[ZooResult]:
    """Every model, in zoo order; ``jobs`` > 1 runs them in that many processes (one thread each)."""
    if jobs <= 1:
        results = []
        for name in names:
            results.append(_run_one(name))
            _progress(results[-1])
        return results
    import multiprocessing

    done = {}
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init) as pool:
        for result in pool.imap_unordered(_run_one, names):
            done[result.name] = result
            _progress(result)
    return [done[name] for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="run only these models")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once, one thread each")
    parser.add_argument("--out", default="docs/coverage.md")
    parser.add_argument("--log", default="", help="also write every stage of every model here")
    parser.add_argument("--json", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    torchvision_shim()  # before anything imports torchvision
    names = []
    for name in args.only or list(ZOO):
        needs = ZOO[name].needs
        if needs and importlib.util.find_spec(needs) is None:
            print(f"SKIP {name}: {needs} is not installed", flush=True)
        else:
            names.append(name)
    start = time.perf_counter()
    results = run_all(names, args.jobs)
    Path(args.out).write_text(render(results, time.perf_counter() - start, args.jobs))
    if args.log:
        write_log(results, Path(args.log))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], default=str, indent=1))
    print(f"wrote {args.out}: {sum(r.end_to_end for r in results)}/{len(results)} end to end")


if __name__ == "__main__":
    main()
