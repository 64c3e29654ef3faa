"""Real, smaller checkpoints from a model pare saved: one module per format.

- :mod:`.compressed_tensors`: ``pack-quantized`` integer weights (W8A16 / W4A16 ...), a directory that
  ``AutoModelForCausalLM.from_pretrained`` loads.
- :mod:`.gguf`: one ``.gguf`` file for llama.cpp (Q8_0 / Q4_0 from pare's integer grids, F16 / BF16 /
  F32 for unquantized weights), which transformers' GGUF loader reads too.

The fake-quantized weights pare saves are exact points of their scheme's grid; :mod:`.source` recovers
codes and scales from them bit for bit, so the exported model computes what the saved one does. Every
refusal (a format that cannot hold the model) comes before any weight is read, and names the formats
that can.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pare.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "gguf")


def export(path: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False,
           gguf_type: str | None = None) -> dict[str, Any]:
    """Export the model saved at ``path`` to ``fmt`` at ``out`` (a directory, or a ``.gguf`` file).

    Args:
        path: a directory written by ``pare prune`` / ``pare quantize`` / ``pare run``.
        fmt: one of :data:`FORMATS`.
        out: the output directory (compressed-tensors) or file (gguf); written atomically.
        overwrite: replace an existing output.
        gguf_type: GGUF only: the tensor type of an unquantized model's matrices (``f16``, ``bf16``,
            ``f32``; default: the model's dtype). A quantized model's type follows from its scheme.

    Returns:
        The export record (also written as ``pare_export.json`` for directories): format, the
        quantization, the byte account.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if gguf_type is not None and fmt != "gguf":
        raise ConfigError("--gguf-type applies to --format gguf only")
    from pare.io.export.source import read_source, write_record

    src = read_source(path)
    if fmt == "compressed-tensors":
        from pare.io.export import compressed_tensors as ct

        ct.check(src)
        target = _check_dir(out, overwrite, src.path)

        def fill(tmp: Path) -> dict[str, Any]:
            rec = ct.write(src, tmp)
            write_record(tmp, src, fmt, rec)
            return rec

        record = _atomic_dir(target, out, overwrite, fill)
        return {"format": fmt, "out": str(target), **record}
    from pare.io.export import gguf as gg

    plan = gg.check(src, gguf_type)
    file = _check_file(out, overwrite)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        record = gg.write(src, plan, tmp)
        os.replace(tmp, file)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"format": fmt, "out": str(file), **record}


def _check_dir(out: str | Path, overwrite: bool, source: Path) -> Path:
    from pare.io.outdir import check_output

    return check_output(out, overwrite, source)


def _atomic_dir(target: Path, out: str | Path, overwrite: bool, fill: Any) -> dict[str, Any]:
    """Run ``fill(tmp)`` on a fresh temporary directory beside ``target``, then rename it into place."""
    from pare.io.outdir import move_into_place, temp_dir

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target)
    try:
        record: dict[str, Any] = fill(tmp)
        tmp.chmod(0o755)
        move_into_place(tmp, target, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return record


def _check_file(out: str | Path, overwrite: bool) -> Path:
    file = Path(out).absolute()
    if file.suffix != ".gguf":
        raise ConfigError(f"--out {str(out)!r}: a GGUF export is one file; name it *.gguf")
    if file.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a directory; give a file name ending in .gguf")
    if file.exists() and not overwrite:
        raise ConfigError(f"{str(out)!r} exists; pass --overwrite to replace it")
    file.parent.mkdir(parents=True, exist_ok=True)
    return file
