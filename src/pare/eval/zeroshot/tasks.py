"""The zero-shot tasks of the pruning papers, with lm-evaluation-harness 0.4.x prompts.

Each task turns its data set's rows into *documents* of one of three kinds:

* ``multiple_choice``: ``{"context", "choices", "gold"}``; request ``i`` is
  ``(context, " " + choices[i])`` (the harness's ``target_delimiter``).
* ``multiple_input`` (WinoGrande's partial scoring): ``{"contexts", "target", "gold"}``; request ``i``
  is ``(contexts[i], " " + target)``.
* ``loglikelihood`` (LAMBADA): ``{"context", "target"}``, one request ``(context, target)``.

The prompt functions take rows in the Hugging Face schema the harness reads (its task YAMLs are
quoted in each docstring); the local files of ``$PARE_DATA_DIR/zeroshot`` are converted to that schema
first, so both sources go through the same prompt code.
"""

from __future__ import annotations

import bz2
import gzip
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pare.errors import ConfigError

Doc = dict[str, Any]

BLIMP_PARADIGMS = (
    "adjunct_island", "anaphor_gender_agreement", "anaphor_number_agreement", "animate_subject_passive",
    "animate_subject_trans", "causative", "complex_NP_island", "coordinate_structure_constraint_complex_left_branch",
    "coordinate_structure_constraint_object_extraction", "determiner_noun_agreement_1",
    "determiner_noun_agreement_2", "determiner_noun_agreement_irregular_1", "determiner_noun_agreement_irregular_2",
    "determiner_noun_agreement_with_adj_2", "determiner_noun_agreement_with_adj_irregular_1",
    "determiner_noun_agreement_with_adj_irregular_2", "determiner_noun_agreement_with_adjective_1",
    "distractor_agreement_relational_noun", "distractor_agreement_relative_clause", "drop_argument",
    "ellipsis_n_bar_1", "ellipsis_n_bar_2", "existential_there_object_raising", "existential_there_quantifiers_1",
    "existential_there_quantifiers_2", "existential_there_subject_raising", "expletive_it_object_raising",
    "inchoative", "intransitive", "irregular_past_participle_adjectives", "irregular_past_participle_verbs",
    "irregular_plural_subject_verb_agreement_1", "irregular_plural_subject_verb_agreement_2",
    "left_branch_island_echo_question", "left_branch_island_simple_question", "matrix_question_npi_licensor_present",
    "npi_present_1", "npi_present_2", "only_npi_licensor_present", "only_npi_scope", "passive_1", "passive_2",
    "principle_A_c_command", "principle_A_case_1", "principle_A_case_2", "principle_A_domain_1",
    "principle_A_domain_2", "principle_A_domain_3", "principle_A_reconstruction",
    "regular_plural_subject_verb_agreement_1", "regular_plural_subject_verb_agreement_2",
    "sentential_negation_npi_licensor_present", "sentential_negation_npi_scope", "sentential_subject_island",
    "superlative_quantifiers_1", "superlative_quantifiers_2", "tough_vs_raising_1", "tough_vs_raising_2",
    "transitive", "wh_island", "wh_questions_object_gap", "wh_questions_subject_gap",
    "wh_questions_subject_gap_long_distance", "wh_vs_that_no_gap", "wh_vs_that_no_gap_long_distance",
    "wh_vs_that_with_gap", "wh_vs_that_with_gap_long_distance",
)


@dataclass(frozen=True)
class HubSource:
    """The ``datasets.load_dataset(path, name, split=split)`` call the harness makes."""

    path: str
    name: str | None
    split: str

    def describe(self) -> str:
        args = [repr(self.path)] + ([repr(self.name)] if self.name else [])
        return f"datasets.load_dataset({', '.join(args)}, split={self.split!r})"


@dataclass(frozen=True)
class Task:
    """One zero-shot task.

    Attributes:
        name: the harness's task name.
        kind: ``multiple_choice``, ``multiple_input`` or ``loglikelihood`` (see the module docstring).
        metrics: what the harness reports (``acc``, ``acc_norm``, ``perplexity``).
        local_files: files under ``$PARE_DATA_DIR`` that hold the task (all needed).
        read_local: those files (as paths, same order) and a document limit (None: all) -> documents
            (at least the first ``limit``; a reader may stop early).
        hub: where the harness downloads the data.
        from_hub: one Hugging Face row -> one document.
        note: a caveat on the local copy, shown in results.
    """

    name: str
    kind: str
    metrics: tuple[str, ...]
    local_files: tuple[str, ...]
    read_local: Callable[[list[Path], int | None], list[Doc]]
    hub: HubSource
    from_hub: Callable[[dict[str, Any]], Doc]
    note: str | None = None


# ---------------------------------------------------------------------------------------------
# Prompts (Hugging Face schema -> document), one per task, as in the harness's YAML.


def piqa_doc(row: dict[str, Any]) -> Doc:
    """``doc_to_text: "Question: {{goal}}\\nAnswer:"``, ``doc_to_choice: [sol1, sol2]``, ``doc_to_target: label``."""
    return {"context": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
            "gold": int(row["label"])}


def arc_doc(row: dict[str, Any]) -> Doc:
    """``doc_to_text: "Question: {{question}}\\nAnswer:"``, ``doc_to_choice: choices.text``,
    ``doc_to_target: choices.label.index(answerKey)``."""
    return {"context": f"Question: {row['question']}\nAnswer:", "choices": list(row["choices"]["text"]),
            "gold": list(row["choices"]["label"]).index(row["answerKey"])}


def openbookqa_doc(row: dict[str, Any]) -> Doc:
    """``doc_to_text: question_stem`` (no prefix), ``doc_to_choice: choices.text``,
    ``doc_to_target: choices.label.index(answerKey.lstrip())``."""
    return {"context": row["question_stem"], "choices": list(row["choices"]["text"]),
            "gold": list(row["choices"]["label"]).index(row["answerKey"].lstrip())}


def boolq_doc(row: dict[str, Any]) -> Doc:
    """``doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"``, choices ``["no", "yes"]``, gold = label."""
    label = row["label"]
    gold = int(label.strip().lower() == "true") if isinstance(label, str) else int(label)
    return {"context": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": gold}


def hellaswag_preprocess(text: str) -> str:
    """The harness's ``hellaswag/utils.py preprocess``: strip, ``" [title]"`` -> ``". "``, drop ``[...]``,
    ``"  "`` -> ``" "``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict[str, Any]) -> Doc:
    """``query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``, choices = the
    preprocessed endings, gold = ``int(label)``."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"context": hellaswag_preprocess(row["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in row["endings"]], "gold": int(row["label"])}


def winogrande_doc(row: dict[str, Any]) -> Doc:
    """Partial scoring: contexts ``sentence[:idx] + option{1,2}`` (``idx`` = the blank), the shared target
    ``sentence[idx + 1:].strip()``, gold ``{"1": 0, "2": 1}[answer]``."""
    idx = row["sentence"].index("_")
    return {"contexts": [row["sentence"][:idx] + row["option1"], row["sentence"][:idx] + row["option2"]],
            "target": row["sentence"][idx + 1:].strip(), "gold": {"1": 0, "2": 1}[row["answer"]]}


def lambada_doc(row: dict[str, Any]) -> Doc:
    """``doc_to_text: text.split(' ')[:-1]|join(' ')``, ``doc_to_target: ' ' + text.split(' ')[-1]``."""
    words = row["text"].split(" ")
    return {"context": " ".join(words[:-1]), "target": " " + words[-1]}


def blimp_doc(row: dict[str, Any]) -> Doc:
    """``doc_to_text: ""``, ``doc_to_choice: [sentence_good, sentence_bad]``, ``doc_to_target: 0``."""
    return {"context": "", "choices": [row["sentence_good"], row["sentence_bad"]], "gold": 0}


# ---------------------------------------------------------------------------------------------
# Local files -> documents (through the Hugging Face schema where the file allows it).


def _jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        # split on "\n" only: a JSON string may hold U+2028, which str.splitlines would break on
        return [json.loads(line) for line in f.read().split("\n") if line.strip()]


def _lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _read_piqa(paths: list[Path], limit: int | None = None) -> list[Doc]:
    rows, labels = _jsonl(paths[0]), _lines(paths[1])
    if len(rows) != len(labels):
        raise ConfigError(f"{paths[0]} has {len(rows)} items but {paths[1]} has {len(labels)} labels")
    return [piqa_doc({**r, "label": int(lab)}) for r, lab in zip(rows, labels, strict=True)]


def _ai2_row(r: dict[str, Any]) -> dict[str, Any]:
    """AI2's ``{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}`` in the HF layout."""
    q = r["question"]
    return {"question": q["stem"], "question_stem": q["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}}


def _read_arc(paths: list[Path], limit: int | None = None) -> list[Doc]:
    return [arc_doc(_ai2_row(r)) for r in _jsonl(paths[0])]


def _read_openbookqa(paths: list[Path], limit: int | None = None) -> list[Doc]:
    return [openbookqa_doc(_ai2_row(r)) for r in _jsonl(paths[0])]


def _read_boolq(paths: list[Path], limit: int | None = None) -> list[Doc]:
    return [boolq_doc(r) for r in _jsonl(paths[0])]


def _read_hellaswag(paths: list[Path], limit: int | None = None) -> list[Doc]:
    """llama.cpp's text format: six lines per item (``label: ctx``, gold, four endings). It has no
    ``ctx_b``, so ``ctx_b.capitalize()`` cannot be applied (see the data README)."""
    with bz2.open(paths[0], "rt", encoding="utf-8") as f:
        if limit is None:
            lines = f.read().split("\n")
        else:  # decompress only what the first documents need
            lines = [line.rstrip("\n") for line in itertools.islice(f, 6 * limit)]
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ConfigError(f"{paths[0]}: {len(lines)} lines is not a multiple of 6 (query, gold, 4 endings)")
    return [{"context": hellaswag_preprocess(lines[i]), "gold": int(lines[i + 1]),
             "choices": [hellaswag_preprocess(e) for e in lines[i + 2:i + 6]]} for i in range(0, len(lines), 6)]


def _read_winogrande(paths: list[Path], limit: int | None = None) -> list[Doc]:
    """llm-foundry's copy: ``context_options`` are the harness's two contexts, ``continuation`` its target."""
    return [{"contexts": list(r["context_options"]), "target": r["continuation"], "gold": int(r["gold"])}
            for r in _jsonl(paths[0])]


def _read_lambada(paths: list[Path], limit: int | None = None) -> list[Doc]:
    return [lambada_doc(r) for r in _jsonl(paths[0])]


def _read_blimp(paths: list[Path], limit: int | None = None) -> list[Doc]:
    return [blimp_doc(r) for r in _jsonl(paths[0])]


_Z = "zeroshot/"
_MC = ("acc", "acc_norm")


def _blimp_task(paradigm: str) -> Task:
    return Task(f"blimp_{paradigm}", "multiple_choice", ("acc",), (f"{_Z}blimp/{paradigm}.jsonl.gz",), _read_blimp,
                HubSource("nyu-mll/blimp", paradigm, "train"), blimp_doc)


_CORE = (
    Task("piqa", "multiple_choice", _MC, (_Z + "piqa/valid.jsonl", _Z + "piqa/valid-labels.lst"), _read_piqa,
         HubSource("baber/piqa", None, "validation"), piqa_doc),
    Task("arc_easy", "multiple_choice", _MC, (_Z + "arc_easy/ARC-Easy-Test.jsonl",), _read_arc,
         HubSource("allenai/ai2_arc", "ARC-Easy", "test"), arc_doc),
    Task("arc_challenge", "multiple_choice", _MC, (_Z + "arc_challenge/ARC-Challenge-Test.jsonl",), _read_arc,
         HubSource("allenai/ai2_arc", "ARC-Challenge", "test"), arc_doc),
    Task("hellaswag", "multiple_choice", _MC, (_Z + "hellaswag/hellaswag_val_full.txt.bz2",), _read_hellaswag,
         HubSource("Rowan/hellaswag", None, "validation"), hellaswag_doc,
         note="local copy in llama.cpp's text format: ctx_b is not capitalized, so scores are close to, not "
              "identical with, the harness's on the original data"),
    Task("winogrande", "multiple_input", ("acc",), (_Z + "winogrande/winogrande_llmfoundry.jsonl",),
         _read_winogrande, HubSource("allenai/winogrande", "winogrande_xl", "validation"), winogrande_doc),
    Task("boolq", "multiple_choice", ("acc",), (_Z + "boolq/val.jsonl",), _read_boolq,
         HubSource("aps/super_glue", "boolq", "validation"), boolq_doc),
    Task("openbookqa", "multiple_choice", _MC, (_Z + "openbookqa/test.jsonl",), _read_openbookqa,
         HubSource("allenai/openbookqa", "main", "test"), openbookqa_doc),
    Task("lambada_openai", "loglikelihood", ("perplexity", "acc"), (_Z + "lambada_openai/lambada_test.jsonl",),
         _read_lambada, HubSource("EleutherAI/lambada_openai", "default", "test"), lambada_doc),
)

TASKS: dict[str, Task] = {t.name: t for t in _CORE} | {
    f"blimp_{p}": _blimp_task(p) for p in BLIMP_PARADIGMS
}
"""Every task pare scores itself, by the harness's name."""

GROUPS: dict[str, tuple[str, ...]] = {"blimp": tuple(f"blimp_{p}" for p in BLIMP_PARADIGMS)}
"""Names that stand for several tasks; a group's acc is the mean of its tasks' (the harness's
``aggregate_metric_list: mean`` without weighting by size)."""

PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa")
"""The seven tasks of the pruning papers (Wanda, SparseGPT, SliceGPT, LLM-Pruner, ShortGPT)."""


def known_tasks_text() -> str:
    """The names a user can pass, for error messages."""
    core = ", ".join(t.name for t in _CORE)
    return (f"{core}; blimp (the group of {len(BLIMP_PARADIGMS)} paradigms) or one paradigm as "
            f"blimp_<paradigm> (e.g. blimp_{BLIMP_PARADIGMS[0]})")


def resolve_tasks(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Validate task names (a comma-separated string or a sequence), keeping their order and dropping repeats.

    Raises:
        ConfigError: an unknown name (the message lists the known ones) or no name at all.
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    out: list[str] = []
    for raw in items:
        name = str(raw).strip()
        if not name:
            continue
        if name not in TASKS and name not in GROUPS:
            raise ConfigError(f"unknown task {name!r}: known tasks are {known_tasks_text()}")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError(f"no task given: pass one or more of {known_tasks_text()}")
    return out
