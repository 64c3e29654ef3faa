"""Export to one GGUF file (llama.cpp), written with the ``gguf`` package's ``GGUFWriter``.

Tensor types:

- a model pare quantized with symmetric ``int8`` / ``int4`` in groups that are multiples of 32 (or
  per channel, with input widths that are): ``Q8_0`` / ``Q4_0``. Both formats store blocks of 32
  inputs with one fp16 scale ``d`` and signed codes (``Q4_0``: ``q - 8`` with ``q`` in 0..15), so every
  32-block of a pare group takes the group's scale: the blocks are built from pare's own codes and
  scales (:mod:`pare.ops.quant.grid`), not re-quantized, and dequantize to the saved weights exactly
  when the scales are fp16 values (always for float16 models; for bfloat16 ones unless a scale lies
  outside fp16's range; a float32 model's scales generally are not: it is refused);
- unquantized matrices (an unquantized model, or the embeddings and ``lm_head``): the model's dtype
  (``BF16``, ``F16`` or ``F32``), or ``--gguf-type``; norms are always ``F32``.

Only the Llama family (``llama``, and ``mistral`` without a sliding window, which llama.cpp runs as
``llama``) is written: q/k rows are permuted into llama.cpp's rotary layout as its own converter does
(the permutation moves whole rows, so quantized blocks stay intact). The tokenizer goes in when
``gguf.vocab`` reads it (GPT-2 BPE or Llama's byte-fallback BPE). Before the rename, every quantized
tensor is dequantized with ``gguf.quants`` and compared with the saved weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pare.errors import ConfigError
from pare.io.export.source import Source, fit_grids

log = logging.getLogger(__name__)

FORMAT = "gguf"
ARCHS = ("llama", "mistral")
FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = {8: "q8_0", 4: "q4_0"}
BLOCK = 32


@dataclass(frozen=True)
class Plan:
    """What the GGUF file holds: ``matrix_type`` for the quantized decoder linears (``q8_0``, ``q4_0``) or
    None, and ``float_type`` for every other matrix."""

    matrix_type: str | None
    float_type: str


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "f16"}.get(dtype, "f32")


def check(src: Source, gguf_type: str | None) -> Plan:
    """Refuse, before any work, what GGUF cannot hold (naming the formats that can); else the plan."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError("--format gguf needs the gguf package: pip install 'pare[export]' (gguf)") from None
    cfg = src.config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHS:
        raise ConfigError(f"pare writes GGUF for the Llama family ({', '.join(ARCHS)}); {model_type!r} is not one. "
                          "Export it with --format compressed-tensors (quantized) or keep its safetensors")
    if model_type == "mistral" and getattr(cfg, "sliding_window", None):
        raise ConfigError("a Mistral model with a sliding window has no llama.cpp 'llama' layout; use "
                          "--format compressed-tensors")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope scaling {rope.get('rope_type')!r} is not written by pare's GGUF export; use "
                          "--format compressed-tensors")
    if any(k.endswith(".bias") for k in src.tensors):
        raise ConfigError("the model has bias vectors, which llama.cpp's llama layout does not hold; use "
                          "--format compressed-tensors")
    if gguf_type is not None and gguf_type not in FLOAT_TYPES:
        raise ConfigError(f"--gguf-type must be one of {', '.join(FLOAT_TYPES)} (the type of unquantized matrices; "
                          f"quantized ones follow the scheme), got {gguf_type!r}")
    float_type = gguf_type or _dtype_name(src.dtype)
    q = src.quant
    if q is None:
        return Plan(None, float_type)
    if q.activations:
        raise ConfigError(f"GGUF holds weights only: simulated {q.activations} activations are not part of it; "
                          "use --format compressed-tensors (int8 activations) or export a weight-only quantization")
    bits = q.bits
    if bits not in QUANT_TYPES or not q.symmetric:
        kind = q.label()
        raise ConfigError(f"GGUF holds symmetric int8 (Q8_0) and int4 (Q4_0) in groups of a multiple of 32 from pare; "
                          f"{kind} is not one of them. Export it with --format compressed-tensors"
                          + (" (symmetric schemes)" if not q.symmetric else "")
                          + ", or quantize with --scheme int4/int8 --group-size 32/64/128")
    if q.group_size % BLOCK:
        raise ConfigError(f"GGUF's Q8_0 / Q4_0 blocks hold 32 inputs; a group of {q.group_size} does not split into "
                          "them. Quantize with a group size that is a multiple of 32 (32, 64, 128) or per channel, "
                          "or export with --format compressed-tensors")
    if src.dtype == torch.float32:
        raise ConfigError("the model's scales are float32, and Q8_0 / Q4_0 store fp16 scales: the GGUF would not "
                          "compute what the saved model does. Quantize the model loaded in float16 or bfloat16 "
                          "(--dtype bfloat16), or export with --format compressed-tensors")
    return Plan(QUANT_TYPES[bits], float_type)


def _permute_rows(n: int, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: HF's half-split rotary pairs interleaved, per head."""
    idx = np.arange(n)
    return idx.reshape(heads, 2, n // heads // 2).swapaxes(1, 2).reshape(n)


def _blocks(src: Source, key: str, qtype: str) -> np.ndarray:
    """``[out, bytes per row]`` uint8 Q8_0 / Q4_0 blocks of a fitted matrix, from its codes and scales."""
    m = src.matrices[key]
    codes = m.grid.codes.to(torch.int32)
    rows, cols = codes.shape
    scale = m.grid.scale.to(torch.float16).repeat_interleave(m.group // BLOCK, dim=1)  # one per 32-block
    d = scale.numpy().reshape(rows, cols // BLOCK, 1).view(np.uint8)  # [rows, nb, 2]
    c = codes.numpy().reshape(rows, cols // BLOCK, BLOCK)
    if qtype == "q8_0":
        qs = c.astype(np.int8).view(np.uint8)
    else:
        u = (c + 8).astype(np.uint8)
        qs = u[..., :16] | (u[..., 16:] << np.uint8(4))
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def _fp16_scales(src: Source) -> None:
    for key, m in src.matrices.items():
        s = m.grid.scale
        if not torch.equal(s.to(torch.float16).to(s.dtype), s):
            raise ConfigError(f"{key}: some scales lie outside fp16's range, and Q8_0 / Q4_0 store fp16 scales. "
                              "Export with --format compressed-tensors (scales in the model's dtype)")


def _float_array(t: torch.Tensor, ftype: str) -> tuple[np.ndarray, Any]:
    """``t`` as the numpy array the writer takes for ``ftype`` (bf16 as its raw 16-bit words)."""
    import gguf

    if ftype == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16
    if ftype == "f16":
        return t.to(torch.float16).numpy(), None
    return t.to(torch.float32).numpy(), None


def _metadata(writer: Any, src: Source, plan: Plan) -> None:
    import gguf

    cfg = src.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    name = src.path.name + (" mistral" if cfg.model_type == "mistral" else "")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0)))
    writer.add_vocab_size(cfg.vocab_size)
    ftype = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}.get(
        plan.matrix_type or "", {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[plan.float_type])
    writer.add_file_type(int(ftype))


def _tokenizer(writer: Any, src: Source) -> bool:
    """Add the tokenizer when ``gguf.vocab`` reads it; False (logged) otherwise."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    vocab: Any = None
    for cls in (BpeVocab, LlamaHfVocab):
        try:
            vocab = cls(src.path)
            break
        except (FileNotFoundError, ValueError, KeyError, TypeError, ImportError):
            continue
    if vocab is None:
        log.warning("the tokenizer of %s is neither GPT-2 BPE nor Llama's: the GGUF holds no tokenizer", src.path)
        return False
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    n = src.config.vocab_size
    for i in range(len(tokens), n):  # the embedding has rows no token uses (padding)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens[:n])
    writer.add_token_scores(scores[:n])
    writer.add_token_types(types[:n])
    SpecialVocab(src.path, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n).add_to_gguf(writer, quiet=True)
    return True


def _verify(name: str, data: np.ndarray, qtype: Any, expected: torch.Tensor) -> None:
    from gguf.quants import dequantize

    back = torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype))).to(expected.dtype)
    if not torch.equal(back.reshape(expected.shape), expected):
        raise ConfigError(f"internal check failed: {name} does not dequantize to the saved weights; nothing was "
                          "written")


def write(src: Source, plan: Plan, file: Path) -> dict[str, Any]:
    """Write the GGUF file ``file`` (a temporary name the caller renames); returns the record."""
    import gguf

    if plan.matrix_type is not None:
        fit_grids(src, "GGUF holds only matrices on one integer grid")
        _fp16_scales(src)
    cfg = src.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(file), "llama")
    _metadata(writer, src, plan)
    has_tokenizer = _tokenizer(writer, src)
    qtypes = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    counts: dict[str, int] = {}
    for key, t in src.tensors.items():
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConfigError(f"{key} has no llama.cpp name; use --format compressed-tensors")
        perm = _permute_rows(t.shape[0], heads) if ".attn_q." in new else \
            _permute_rows(t.shape[0], kv_heads) if ".attn_k." in new else None
        if key in src.matrices and plan.matrix_type is not None:
            qtype = qtypes[plan.matrix_type]
            data = _blocks(src, key, plan.matrix_type)
            _verify(key, data, qtype, src.tensors[key])
            kind = plan.matrix_type
        elif t.dim() == 1:
            data, qtype, kind = t.to(torch.float32).numpy(), None, "f32"
        else:
            data, qtype = _float_array(t, plan.float_type)
            kind = plan.float_type
        if perm is not None:
            data = data[perm]
        writer.add_tensor(new, np.ascontiguousarray(data), raw_dtype=qtype)
        counts[kind] = counts.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensor_types": counts, "file_bytes": file.stat().st_size, "tokenizer": has_tokenizer,
            "matrix_type": plan.matrix_type, "float_type": plan.float_type}
