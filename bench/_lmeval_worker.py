"""Run lm-evaluation-harness tasks on local files and write their per-request log-likelihoods (JSON).

Executed by bench/zeroshot_vs_harness.py with the python of bench/.venv-lmeval (lm-eval is not a
dependency of pare). Arguments: model dir, task dir (holding the YAMLs), comma-separated task names,
limit, batch size, output file. One process serves every task (lm-eval's import and task index cost
seconds each time); each task is timed on its own, wall clock and process CPU time.
"""

import json
import sys
import time

import torch


def main() -> None:
    model, task_dir, tasks, limit, batch_size, out = sys.argv[1:7]
    torch.set_num_threads(1)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, dtype="float32", device="cpu", batch_size=int(batch_size))
    manager = TaskManager(include_path=task_dir)
    report = {}
    for task in tasks.split(","):
        start, cpu_start = time.perf_counter(), time.process_time()
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=int(limit), task_manager=manager,
                                      log_samples=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        lls = [[float(r[0][0]), bool(r[0][1])] for s in samples for r in s["resps"]]
        report[task] = {"seconds": seconds, "cpu_seconds": cpu_seconds, "results": res["results"][task],
                        "requests": lls, "version": getattr(lm_eval, "__version__", None)}
        print(json.dumps({task: {"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2)}}),
              file=sys.stderr, flush=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, default=str)


if __name__ == "__main__":
    main()
