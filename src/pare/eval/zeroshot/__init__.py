"""Zero-shot tasks (PIQA, ARC, HellaSwag, WinoGrande, BoolQ, OpenBookQA, LAMBADA, BLiMP) scored as
lm-evaluation-harness 0.4.x scores them, with batched log-likelihoods and shared contexts."""

from pare.eval.zeroshot.harness import run_lm_eval
from pare.eval.zeroshot.loglik import Encoded, LoglikelihoodRunner, encode_pair, harness_max_length
from pare.eval.zeroshot.score import evaluate_tasks, requests_of
from pare.eval.zeroshot.tasks import GROUPS, PAPER_TASKS, TASKS, Task, resolve_tasks

__all__ = [
    "GROUPS", "PAPER_TASKS", "TASKS", "Encoded", "LoglikelihoodRunner", "Task", "encode_pair", "evaluate_tasks",
    "harness_max_length", "requests_of", "resolve_tasks", "run_lm_eval",
]
