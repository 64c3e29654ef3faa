"""Zero-shot accuracy as lm-evaluation-harness 0.4.x reports it: requests, metrics and their stderr.

For a multiple-choice document with summed log-likelihoods ``ll[i]`` of its choices,

    acc      = [argmax_i ll[i] == gold]
    acc_norm = [argmax_i ll[i] / len(choice_i) == gold]     (len in characters, without the delimiter)

(``argmax`` takes the first of equal values, as ``np.argmax``). LAMBADA reports
``acc = [every target token is greedy]`` and ``perplexity = exp(-mean over documents of ll)``.
A task's figure is the mean over its documents and its stderr the sample standard deviation over
``sqrt(n)`` (the harness's ``mean_stderr``); a group (BLiMP) is the unweighted mean of its tasks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from pare.errors import ConfigError
from pare.eval.zeroshot.data import load_docs
from pare.eval.zeroshot.loglik import Encoded, LoglikelihoodRunner, encode_pair, harness_max_length
from pare.eval.zeroshot.tasks import GROUPS, TASKS, Doc, Task, resolve_tasks

logger = logging.getLogger(__name__)

DELIMITER = " "  # the harness's default target_delimiter


def requests_of(task: Task, doc: Doc) -> list[tuple[str, str]]:
    """The ``(context, continuation)`` string pairs the harness builds for one document."""
    if task.kind == "multiple_choice":
        return [(doc["context"], DELIMITER + choice) for choice in doc["choices"]]
    if task.kind == "multiple_input":
        return [(context, DELIMITER + doc["target"]) for context in doc["contexts"]]
    return [(doc["context"], doc["target"])]


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation over ``sqrt(n)``; NaN below two values."""
    n = len(values)
    if n < 2:
        return math.nan
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def _first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def doc_metrics(task: Task, doc: Doc, scores: list[tuple[float, bool]]) -> dict[str, float]:
    """Per-document metrics from the ``(loglik, greedy)`` of its requests."""
    if task.kind == "loglikelihood":
        ll, greedy = scores[0]
        return {"acc": float(greedy), "ll": ll}
    lls = [s[0] for s in scores]
    out = {"acc": float(_first_argmax(lls) == doc["gold"])}
    if "acc_norm" in task.metrics:
        normed = [ll / len(choice) for ll, choice in zip(lls, doc["choices"], strict=True)]
        out["acc_norm"] = float(_first_argmax(normed) == doc["gold"])
    return out


def aggregate(task: Task, per_doc: list[dict[str, float]]) -> dict[str, Any]:
    """Task figures from per-document metrics: means, stderrs, ``n`` and LAMBADA's perplexity."""
    out: dict[str, Any] = {}
    for metric in ("acc", "acc_norm"):
        if per_doc and metric in per_doc[0]:
            values = [d[metric] for d in per_doc]
            out[metric] = sum(values) / len(values)
            out[f"{metric}_stderr"] = mean_stderr(values)
    if task.kind == "loglikelihood":
        out["ppl"] = math.exp(-sum(d["ll"] for d in per_doc) / len(per_doc))
    out["n"] = len(per_doc)
    if task.note:
        out["note"] = task.note
    return out


def _group_figures(members: list[dict[str, Any]]) -> dict[str, Any]:
    """The unweighted mean of the tasks' acc; stderr ``sqrt(sum stderr_i^2) / k`` (the harness's
    ``unweighted_mean_stderr`` for ``weight_by_size: false``)."""
    accs = [m["acc"] for m in members]
    stderr = math.sqrt(sum(m["acc_stderr"] ** 2 for m in members)) / len(members)
    return {"acc": sum(accs) / len(accs), "acc_stderr": stderr, "n": sum(m["n"] for m in members)}


def evaluate_tasks(model: nn.Module, tokenizer: Any, tasks: Sequence[str] | str, *, limit: int | None = None,
                   batch_size: int = 16, progress: bool = True, share_context: bool = True,
                   return_loglikelihoods: bool = False) -> dict[str, Any]:
    """Score ``model`` on zero-shot tasks as lm-evaluation-harness 0.4.x does.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        tasks: task names (see :data:`TASKS`) or groups (``blimp``), or one comma-separated string.
        limit: score only the first ``limit`` documents of each task (the harness's ``--limit``).
        batch_size: rows per forward.
        progress: show a progress bar per task.
        share_context: run the tokens the requests of a task share once (a question's context, WinoGrande's
            sentence start and twin sentences), packing a prefix trie into rows; False scores each request alone.
        return_loglikelihoods: also return each task's per-request ``(loglik, greedy)`` under ``"requests"``.

    Returns:
        ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", ["ppl"]}},
        "mean_acc": mean over the tasks asked of acc}`` (``acc_norm`` only where the harness reports it;
        a group's tasks appear beside the group's own entry).
    """
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise ConfigError("zero-shot tasks need the model's tokenizer (pass the tokenizer that load_model returned; "
                          f"got {type(tokenizer).__name__})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer (the first N documents of each task), got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    asked = resolve_tasks(tasks if isinstance(tasks, str) else list(tasks))
    names: list[str] = []
    for name in asked:
        for member in GROUPS.get(name, (name,)):
            if member not in names:
                names.append(member)
    pad = getattr(tokenizer, "pad_token_id", None)
    runner = LoglikelihoodRunner(model, batch_size=batch_size, max_length=harness_max_length(model, tokenizer),
                                 share_context=share_context, progress=progress,
                                 pad_id=int(pad) if pad is not None else 0)
    docs = {name: load_docs(TASKS[name], limit) for name in names}  # every data file found before any work
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    try:
        for name in names:
            task = TASKS[name]
            pairs = [requests_of(task, d) for d in docs[name]]
            encoded: list[Encoded] = [encode_pair(tokenizer, c, x) for p in pairs for c, x in p]
            scores = runner.run(encoded, desc=name)
            raw[name] = scores
            per_doc, at = [], 0
            for doc, p in zip(docs[name], pairs, strict=True):
                per_doc.append(doc_metrics(task, doc, scores[at:at + len(p)]))
                at += len(p)
            results[name] = aggregate(task, per_doc)
            logger.info("%s: acc %.4f over %d documents", name, results[name]["acc"], len(per_doc))
    finally:
        model.train(was_training)
    for name in asked:
        if name in GROUPS:
            results[name] = _group_figures([results[m] for m in GROUPS[name]])
    out: dict[str, Any] = {"tasks": results, "mean_acc": sum(results[n]["acc"] for n in asked) / len(asked)}
    if return_loglikelihoods:
        out["requests"] = raw
    return out
