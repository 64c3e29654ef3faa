"""A tiny ``$PARE_DATA_DIR/zeroshot`` in the same file formats as ../shared/data/zeroshot (a few items each)."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

PIQA = [
    {"goal": "How do I help the dog?", "sol1": "Give the dog a ball. ", "sol2": "Give the dog a kite."},
    {"goal": "To play in the park", "sol1": "go to the park", "sol2": "go to the tree  and bark"},
    {"goal": "Say hello", "sol1": "Say hello to her friend Tom", "sol2": "Sang a bird"},
]
PIQA_LABELS = [0, 1, 0]


def _ai2(stem: str, texts: list[str], labels: list[str], key: str, qid: str) -> dict:
    return {"id": qid, "question": {"stem": stem, "choices": [{"text": t, "label": lab}
                                                              for t, lab in zip(texts, labels, strict=True)]},
            "answerKey": key}


ARC = [
    _ai2("What did the dog do?", ["ran to the tree", "sang", "a big blue kite", "laughed"], list("ABCD"), "A", "q1"),
    _ai2("Who had a red ball?", ["Lily", "Tom", "the cat"], list("ABC"), "B", "q2"),
    _ai2("What was bright?", ["the sun", "the park", "the dog", "the bird"], list("1234"), "1", "q3"),
]
OBQA = [
    _ai2("The sun was", ["bright", "a dog", "blue", "red"], list("ABCD"), "A", "o1"),
    _ai2("Lily liked to", ["bark", "play in the park", "sing", "fly"], list("ABCD"), " B", "o2"),
]
BOOLQ = [
    {"question": "did lily play in the park", "passage": "Lily -- She liked to play in the park.", "idx": 0,
     "label": "true"},
    {"question": "was the ball blue", "passage": "Tom -- Tom had a red ball.", "idx": 1, "label": "false"},
]
HELLASWAG = [  # llama.cpp text format: "label: ctx", gold, four endings
    ("Playing: Lily went to the park. she", 2, ["sang", "barked at a cat", "played with her dog", "a kite"]),
    ("Dog [title] walking: The dog ran. it", 0, ["barked at a cat.", "was blue", "sang [step] a song", "Tom"]),
]
WINOGRANDE = [
    {"context_options": ["Lily liked the dog because Lily", "Lily liked the dog because the dog"],
     "continuation": "was kind to her.", "gold": 1},
    {"context_options": ["Tom gave Lily the ball since Tom", "Tom gave Lily the ball since Lily"],
     "continuation": "wanted to play.", "gold": 1},
]
LAMBADA = [{"text": "Lily liked to play in the park with her dog"},
           {"text": "The dog ran to the tree and barked at a cat"},
           {"text": "She said hello to her friend Tom"}]
BLIMP = [{"sentence_good": "The dog ran to the tree.", "sentence_bad": "The dog ran the to tree.", "pairID": "0"},
         {"sentence_good": "Lily liked the park.", "sentence_bad": "Lily liked park the.", "pairID": "1"}]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def write_zeroshot_dir(root: Path) -> Path:
    """Write the tiny sets under ``root/zeroshot`` and return ``root`` (use it as PARE_DATA_DIR)."""
    z = root / "zeroshot"
    _write_jsonl(z / "piqa/valid.jsonl", PIQA)
    (z / "piqa/valid-labels.lst").write_text("".join(f"{x}\n" for x in PIQA_LABELS))
    _write_jsonl(z / "arc_easy/ARC-Easy-Test.jsonl", ARC)
    _write_jsonl(z / "arc_challenge/ARC-Challenge-Test.jsonl", ARC[:2])
    _write_jsonl(z / "openbookqa/test.jsonl", OBQA)
    _write_jsonl(z / "boolq/val.jsonl", BOOLQ)
    _write_jsonl(z / "winogrande/winogrande_llmfoundry.jsonl", WINOGRANDE)
    (z / "winogrande/dev-labels.lst").write_text("".join(f"{r['gold'] + 1}\n" for r in WINOGRANDE))
    _write_jsonl(z / "lambada_openai/lambada_test.jsonl", LAMBADA)
    _write_jsonl(z / "blimp/adjunct_island.jsonl.gz", BLIMP)
    lines = [x for q, g, ends in HELLASWAG for x in (q, str(g), *ends)]
    (z / "hellaswag").mkdir(parents=True, exist_ok=True)
    with bz2.open(z / "hellaswag/hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return root
