"""Where a task's documents come from: ``$PARE_DATA_DIR/zeroshot`` when its files are there, else the
Hugging Face data set the harness downloads (for users with internet)."""

from __future__ import annotations

import logging
from typing import Any

from pare.calibration.sources import hub_failure, local_data_root
from pare.errors import DataNotFoundError
from pare.eval.zeroshot.tasks import Doc, HubSource, Task

logger = logging.getLogger(__name__)


def load_hub_rows(source: HubSource) -> Any:
    """``datasets.load_dataset`` (imported lazily: it is an optional extra). Tests replace this."""
    import datasets

    return datasets.load_dataset(source.path, source.name, split=source.split)


def load_docs(task: Task, limit: int | None = None) -> list[Doc]:
    """The first ``limit`` documents of ``task`` (all when None), in file order, as the harness's ``--limit``.

    Raises:
        DataNotFoundError: neither the local files nor the Hub served the task; the message names every
            place looked.
    """
    looked: list[str] = []
    root = local_data_root(looked)
    if root is not None:
        paths = [root / rel for rel in task.local_files]
        if all(p.is_file() for p in paths):
            docs = task.read_local(paths, limit)
            logger.info("%s: %d documents from %s", task.name, len(docs), ", ".join(map(str, paths)))
            return docs[:limit] if limit is not None else docs
        looked += [f"{p} ({'found' if p.is_file() else 'missing'})" for p in paths]
    call = task.hub.describe()
    try:
        rows = load_hub_rows(task.hub)
    except Exception as exc:  # any hub failure (offline, missing, renamed) means "not found there"
        looked.append(hub_failure(call, exc))
    else:
        n = len(rows) if limit is None else min(limit, len(rows))
        logger.info("%s: %d documents from %s", task.name, n, call)
        return [task.from_hub(rows[i]) for i in range(n)]
    raise DataNotFoundError(
        f"could not find the data of task {task.name!r}. Looked in:\n"
        + "".join(f"  - {place}\n" for place in looked)
        + f"Fix: set PARE_DATA_DIR to a directory holding {' and '.join(task.local_files)}; or pip install "
        "'pare[data]' and allow network access so datasets can download it."
    )
