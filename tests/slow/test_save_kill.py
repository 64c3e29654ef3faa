"""``kill -9`` at random points of ``pare.save``: ``--out`` is never half-written, and the next save removes
what the killed ones left behind.

A forked child process saves the same pruned model to one directory over and over (``overwrite=True``,
so every kill lands in a save: writing the weights, swapping, or deleting the replaced copy); the test
kills it with SIGKILL after a random delay and checks that the directory is absent or holds the
complete model. A last save (this process) must then leave nothing but the output directory, and say
what it removed. Forking skips the seconds a fresh interpreter spends importing torch.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import pare
from tiny import tiny_batch, tiny_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"),
                                 reason="needs os.fork and SIGKILL (POSIX)")]

KILLS = 10


def _private_tqdm_locks() -> None:
    """Give every tqdm class in this (forked) process a lock of its own.

    tqdm's write lock holds a multiprocessing semaphore shared with pytest across the fork, taken even by
    disabled bars; a child killed while holding it blocks pytest's next bar forever. ``tqdm.set_lock`` on
    the base class is not enough: a subclass that made its lock before the fork (``tqdm.auto.tqdm``, which
    transformers uses) keeps its own ``_lock``, so every class in the tree gets the new lock.
    """
    import threading

    from tqdm import tqdm as base

    lock = threading.RLock()
    classes = [base]
    while classes:
        cls = classes.pop()
        cls.set_lock(lock)
        classes.extend(cls.__subclasses__())


def _saving_child(model, report, out: Path) -> int:
    """Fork a process that saves ``model`` to ``out`` until killed; return its pid once it has started."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            _private_tqdm_locks()
            os.close(read)
            os.write(write, b"s")
            os.close(write)
            while True:
                pare.save(model, None, out, report, overwrite=True)
        finally:
            os._exit(code)
    os.close(write)
    assert os.read(read, 1) == b"s"
    os.close(read)
    return pid


def _check_complete(out: Path, expected: torch.Tensor, names: list[str]) -> None:
    assert sorted(p.name for p in out.iterdir()) == names, f"{out} is half-written: {sorted(out.iterdir())}"
    with torch.no_grad():
        assert torch.equal(pare.load(out)(tiny_batch(1, 8)).logits, expected)


def test_kill_9_never_leaves_a_half_written_output(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("TQDM_DISABLE", "1")  # no progress-bar threads in the forked child
    model = tiny_model("llama", hidden_size=192, intermediate_size=768, num_hidden_layers=6, vocab_size=4000,
                       num_attention_heads=6, num_key_value_heads=3)  # about 25 MB: a save takes a while
    report = pare.prune(model, pare.MagnitudeConfig(sparsity=0.5), runtime=pare.RuntimeConfig(progress=False))
    reference = tmp_path / "reference"
    start = time.perf_counter()
    pare.save(model, None, reference, report)
    seconds = time.perf_counter() - start
    names = sorted(p.name for p in reference.iterdir())
    with torch.no_grad():
        expected = model(tiny_batch(1, 8)).logits
    out = tmp_path / "out"
    rng = random.Random(0)
    leftovers_seen = 0
    for _ in range(KILLS):
        pid = _saving_child(model, report, out)
        time.sleep(rng.uniform(0.0, 3.0 * seconds))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"the saving child ended by itself (status {status})"
        if out.exists():
            _check_complete(out, expected, names)
        leftovers_seen += any(p.name.startswith(".out.") for p in tmp_path.iterdir())
    assert leftovers_seen, "no kill landed inside a save: the test did not test anything"
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # by the last kill
    with caplog.at_level(logging.WARNING, logger="pare"):
        pare.save(model, None, out, report, overwrite=True)  # the next successful run
    _check_complete(out, expected, names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"], "an orphan stayed"
    assert all(name in caplog.text for name in left), caplog.text  # it said what it removed
