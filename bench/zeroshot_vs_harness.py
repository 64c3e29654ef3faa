"""pare's zero-shot scoring against lm-evaluation-harness on the same local files, model and threads.

For each task the harness runs from its own venv (bench/.venv-lmeval: ``python3 -m venv``, then
``pip install torch==2.13.0 lm-eval``) on a task YAML that ``include``s the official task and points
``dataset_path: json`` at the local files of ``$PARE_DATA_DIR/zeroshot`` (converted to the Hugging
Face schema the official prompt functions read; WinoGrande's sentence is rebuilt as ``"_ " + target``
with the two contexts as options, which the official functions turn back into the same contexts).
pare runs in this process, after the harness's process has run every task (lm-eval's import and task
index are paid once, outside the timing). Both use float32, one thread, the same batch size and
``--limit``. Prints JSON: per-task accuracies of both, the largest per-request
log-likelihood difference, whether the greedy flags agree, and the time ratios: wall clock, and the
CPU time of each side's process (``time.process_time``; on a shared, loaded machine the wall clock
counts other jobs' time too). Each side's time covers reading its data, tokenizing and scoring.
``--rounds N`` runs both sides N times, alternating which goes first, and compares medians per task.

    PYTHONPATH=src python bench/zeroshot_vs_harness.py --limit 40
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LMEVAL_PY = ROOT / "bench" / ".venv-lmeval" / "bin" / "python"
DEFAULT_MODEL = Path.home() / ".cache" / "pare-models" / "smollm2-135m"
TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa", "lambada_openai")


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f.read().split("\n") if line.strip()]


def _ai2(r: dict, stem_key: str) -> dict:
    q = r["question"]
    return {"id": r["id"], stem_key: q["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}}


def hf_rows(task: str, zdir: Path) -> list[dict]:
    """The local files of ``task`` in the Hugging Face schema the official task reads."""
    if task == "piqa":
        labels = (zdir / "piqa/valid-labels.lst").read_text().split()
        return [{**r, "label": int(lab)} for r, lab in zip(_jsonl(zdir / "piqa/valid.jsonl"), labels, strict=True)]
    if task in ("arc_easy", "arc_challenge"):
        name = "ARC-Easy-Test" if task == "arc_easy" else "ARC-Challenge-Test"
        return [_ai2(r, "question") for r in _jsonl(zdir / task / f"{name}.jsonl")]
    if task == "openbookqa":
        return [_ai2(r, "question_stem") for r in _jsonl(zdir / "openbookqa/test.jsonl")]
    if task == "boolq":
        return [{**r, "label": int(r["label"] == "true")} for r in _jsonl(zdir / "boolq/val.jsonl")]
    if task == "winogrande":
        return [{"sentence": "_ " + r["continuation"], "option1": r["context_options"][0],
                 "option2": r["context_options"][1], "answer": str(r["gold"] + 1)}
                for r in _jsonl(zdir / "winogrande/winogrande_llmfoundry.jsonl")]
    if task == "hellaswag":
        with bz2.open(zdir / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        rows = []
        for i in range(0, len(lines) - 5, 6):
            label, _, ctx = lines[i].partition(": ")
            rows.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": lines[i + 2:i + 6],
                         "label": lines[i + 1]})
        return rows
    if task == "lambada_openai":
        return _jsonl(zdir / "lambada_openai/lambada_test.jsonl")
    raise ValueError(task)


_OFFICIAL = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
             "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
             "boolq": "super_glue/boolq/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
             "lambada_openai": "lambada/lambada_openai.yaml"}
_SPLIT = {"piqa": "validation", "arc_easy": "test", "arc_challenge": "test", "hellaswag": "validation",
          "winogrande": "validation", "boolq": "validation", "openbookqa": "test", "lambada_openai": "test"}


def write_task(task: str, zdir: Path, work: Path, tasks_root: Path, limit: int) -> str:
    """A YAML that includes the official task and reads the converted local rows; returns its task name."""
    data = work / f"{task}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for row in hf_rows(task, zdir)[:limit]:
            f.write(json.dumps(row) + "\n")
    name = f"pare_local_{task}"
    split = _SPLIT[task]
    splits = {k: None for k in ("training_split", "validation_split", "test_split", "fewshot_split")}
    splits["test_split" if split == "test" else "validation_split"] = split
    lines = [f"include: {tasks_root / _OFFICIAL[task]}", f"task: {name}", "tag: []", "dataset_path: json",
             "dataset_name: null", f"dataset_kwargs:\n  data_files:\n    {split}: {data}"]
    lines += [f"{k}: {v if v else 'null'}" for k, v in splits.items()]
    (work / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return name


def run_harness(args, tasks: list[str], zdir: Path, work: Path, tasks_root: Path) -> dict:
    """Every task in one harness process (its import and task index are paid once, outside the timing)."""
    names = {task: write_task(task, zdir, work, tasks_root, args.limit) for task in tasks}
    out = work / "harness.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([str(LMEVAL_PY), str(ROOT / "bench" / "_lmeval_worker.py"), str(args.model), str(work),
                    ",".join(names[t] for t in tasks), str(args.limit), str(args.batch_size), str(out)], check=True,
                   env=env, stdout=subprocess.DEVNULL, stderr=None if args.verbose else subprocess.DEVNULL)
    got = json.loads(out.read_text())
    return {task: got[names[task]] for task in tasks}


def run_pare(args, model, tok, task: str) -> dict:
    from pare.eval.zeroshot import evaluate_tasks

    start, cpu_start = time.perf_counter(), time.process_time()
    res = evaluate_tasks(model, tok, [task], limit=args.limit, batch_size=args.batch_size, progress=False,
                         return_loglikelihoods=True)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "results": res["tasks"][task],
            "requests": res["requests"][task]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1,
                   help="alternating rounds (harness then pare, then pare then harness, ...); medians are compared")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if not LMEVAL_PY.exists():
        print(json.dumps({"skipped": f"{LMEVAL_PY} missing: python3 -m venv bench/.venv-lmeval && "
                          "bench/.venv-lmeval/bin/pip install torch==2.13.0 lm-eval"}))
        return 0
    if not (args.model / "config.json").exists():
        print(json.dumps({"skipped": f"{args.model} missing: run ../shared/models/fetch-real-models"}))
        return 0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pare.calibration.sources import data_dir

    torch.set_num_threads(1)
    root = data_dir()
    zdir = (root or Path("/nonexistent")) / "zeroshot"
    tasks_root = Path(subprocess.check_output(
        [str(LMEVAL_PY), "-c", "import lm_eval.tasks, os; print(os.path.dirname(lm_eval.tasks.__file__))"],
        text=True).strip())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    report: dict = {"model": str(args.model), "limit": args.limit, "batch_size": args.batch_size, "threads": 1,
                    "dtype": "float32", "rounds": args.rounds, "tasks": {}}
    tasks = [t.strip() for t in args.tasks.split(",")]
    harness_runs: list[dict] = []
    pare_runs: list[dict] = []
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="pare-zs-bench-") as tmp:
        for r in range(args.rounds):  # alternate which side goes first: the load drifts during a run
            for side in ("harness", "pare") if r % 2 == 0 else ("pare", "harness"):
                if side == "harness":
                    harness_runs.append(run_harness(args, tasks, zdir, Path(tmp), tasks_root))
                else:
                    pare_runs.append({task: run_pare(args, model, tok, task) for task in tasks})
                loads.append(os.getloadavg()[0])
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    for task in tasks:
        h, q = harness_runs[0][task], pare_runs[0][task]
        diffs = [abs(a[0] - b[0]) for a, b in zip(h["requests"], q["requests"], strict=True)]
        greedy_same = all(a[1] == b[1] for a, b in zip(h["requests"], q["requests"], strict=True))
        hr = {m.split(",")[0]: v for m, v in h["results"].items() if m.split(",")[0] in ("acc", "acc_norm",
                                                                                       "perplexity")}
        pr = {m: q["results"][m] for m in ("acc", "acc_norm", "ppl") if m in q["results"]}
        same_every_round = all(run[task]["requests"] == q["requests"] for run in pare_runs)
        h_s, q_s, h_cpu, q_cpu = (statistics.median(run[task][key] for run in runs) for runs, key in (
            (harness_runs, "seconds"), (pare_runs, "seconds"), (harness_runs, "cpu_seconds"),
            (pare_runs, "cpu_seconds")))
        ratio, cpu_ratio = h_s / q_s, h_cpu / q_cpu
        ratios.append(ratio)
        cpu_ratios.append(cpu_ratio)
        report["tasks"][task] = {
            "harness": hr, "pare": pr, "requests": len(diffs), "max_abs_loglik_diff": max(diffs),
            "greedy_flags_equal": greedy_same, "pare_same_every_round": same_every_round,
            "acc_equal": hr.get("acc") == pr.get("acc") and hr.get("acc_norm") == pr.get("acc_norm"),
            "harness_s": round(h_s, 2), "pare_s": round(q_s, 2), "speedup": round(ratio, 2),
            "harness_cpu_s": round(h_cpu, 2), "pare_cpu_s": round(q_cpu, 2), "cpu_speedup": round(cpu_ratio, 2),
            "cpu_speedup_per_round": [round(hh[task]["cpu_seconds"] / pp[task]["cpu_seconds"], 2)
                                      for hh, pp in zip(harness_runs, pare_runs, strict=True)],
        }
        print(json.dumps({task: report["tasks"][task]}), file=sys.stderr, flush=True)
    rows = report["tasks"].values()
    report["all_acc_equal"] = all(r["acc_equal"] for r in rows)
    report["max_abs_loglik_diff"] = max(r["max_abs_loglik_diff"] for r in rows)
    report["harness_s"] = round(sum(r["harness_s"] for r in rows), 2)
    report["pare_s"] = round(sum(r["pare_s"] for r in rows), 2)
    report["speedup_total"] = round(report["harness_s"] / report["pare_s"], 2)
    report["speedup_median_task"] = round(statistics.median(ratios), 2)
    report["harness_cpu_s"] = round(sum(r["harness_cpu_s"] for r in rows), 2)
    report["pare_cpu_s"] = round(sum(r["pare_cpu_s"] for r in rows), 2)
    report["cpu_speedup_total"] = round(report["harness_cpu_s"] / report["pare_cpu_s"], 2)
    report["cpu_speedup_min_task"] = round(min(cpu_ratios), 2)
    report["load_average_1min"] = [round(x, 1) for x in loads]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
