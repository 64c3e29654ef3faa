"""Export to a compressed-tensors checkpoint (``pack-quantized``): integer weights packed into int32,
group (or per-channel) scales in the model's dtype, loadable by plain ``from_pretrained``.

For every quantized decoder linear the checkpoint holds ``weight_packed`` (the codes, packed with the
package's own :func:`compressed_tensors.compressors.pack_quantized.helpers.pack_to_int32`),
``weight_scale [out, in / g]`` and ``weight_shape``. The config gets the package's
``quantization_config`` (written by ``ModelCompressor.update_config``). Symmetric schemes only: an
asymmetric checkpoint (``weight_zero_point`` packed along the output, pare's codes and zero points
shifted by ``2^(b-1)``) is written correctly by the package but does not load back through
transformers 5.24 with compressed-tensors 0.20 (the loader rebuilds the zero points unpacked), so it
is refused.

Sparse models export as they are: pruned weights are stored as the code of 0 (the dense packing
costs ``b`` bits for them; compressed-tensors has no sparse compressor any more). Before the files
are moved into place, every matrix is decompressed with the package's ``PackedQuantizationCompressor``
and compared with the fake-quantized weights: they must be equal bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from pare.errors import ConfigError
from pare.io.export.source import Source, fit_grids
from pare.ops.quant.bits import BitsAccount, matrix_bits
from pare.ops.quant.scheme import INT_SCHEMES, QuantScheme

FORMAT = "compressed-tensors"
INSTALL = "pip install 'pare[export]' (compressed-tensors)"


def check(src: Source) -> None:
    """Refuse, before any work, a model this format cannot hold."""
    q = src.quant
    if q is None:
        raise ConfigError(f"{str(src.path)!r} is not quantized: compressed-tensors (pack-quantized) holds integer "
                          "weights. Quantize first (pare quantize --scheme int4 ...), or export the unquantized model "
                          "with --format gguf (F16/BF16); its safetensors already load with from_pretrained")
    if q.bits is None:
        raise ConfigError(f"{q.scheme} has no pack-quantized layout: pare exports {', '.join(INT_SCHEMES)} to "
                          "compressed-tensors. Keep the fake-quantized safetensors for MX / NVFP4 results")
    if not q.symmetric:
        raise ConfigError(f"{q.label()}: an asymmetric pack-quantized checkpoint does not load back with "
                          "from_pretrained (transformers 5 + compressed-tensors 0.20 rebuild the packed zero points "
                          "with the wrong shape), so pare does not write one. Quantize symmetric (the default) for "
                          "compressed-tensors or GGUF")
    if q.activations == "fp8":
        raise ConfigError("FP8 activations with integer weights have no pack-quantized layout (compressed-tensors "
                          "packs integer weights with integer or no activation quantization): export the weights of a "
                          "quantization without --act-quant fp8")
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ConfigError(f"--format {FORMAT} needs the compressed-tensors package: {INSTALL}") from None


def _scheme(src: Source) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    q = src.quant
    assert q is not None and q.bits is not None
    weights = QuantizationArgs(num_bits=q.bits, type="int", symmetric=q.symmetric,
                               strategy="group" if q.group_size else "channel", group_size=q.group_size or None)
    acts = None
    if q.activations == "int8":
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts, format="pack-quantized")


def _linear_names(src: Source) -> list[str]:
    from torch import nn

    from pare.io.load import meta_model

    return [n for n, m in meta_model(str(src.path)).named_modules() if isinstance(m, nn.Linear)]


def _packed(src: Source) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: quantized linears packed, everything else as stored."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = src.quant
    assert q is not None and q.bits is not None
    shift = 0 if q.symmetric else 2 ** (q.bits - 1)
    state: dict[str, torch.Tensor] = {}
    for key, t in src.tensors.items():
        m = src.matrices.get(key)
        if m is None:
            state[key] = t
            continue
        base = key[: -len(".weight")]
        state[f"{base}.weight_packed"] = pack_to_int32((m.grid.codes - shift).to(torch.int8), q.bits)
        state[f"{base}.weight_scale"] = m.grid.scale.contiguous()
        state[f"{base}.weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
        if m.grid.zero is not None:
            zp = (m.grid.zero - shift).to(torch.int8)
            state[f"{base}.weight_zero_point"] = pack_to_int32(zp, q.bits, packed_dim=0).contiguous()
    return state


def _verify(src: Source, state: dict[str, torch.Tensor], scheme: Any) -> None:
    """Decompress every packed matrix with the package and compare with the fake-quantized weights."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    for key in src.matrices:
        base = key[: -len(".weight")]
        local = {n[len(base) + 1:]: v for n, v in state.items() if n.startswith(base + ".weight_")}
        out = PackedQuantizationCompressor.decompress(local, scheme)["weight"].to(src.tensors[key].dtype)
        if not torch.equal(out, src.tensors[key]):
            raise ConfigError(f"internal check failed: {key} does not decompress to its fake-quantized weights; "
                              "nothing was written")


def _account(src: Source, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Bytes on disk of the quantized matrices against pare's bits account of them."""
    q = src.quant
    assert q is not None
    acct = BitsAccount()
    for key in src.matrices:
        w = src.tensors[key]
        acct = acct + matrix_bits((int(w.shape[0]), int(w.shape[1])), QuantScheme(q.scheme, q.group_size, q.symmetric))
    kinds = {"weight_packed": 0, "weight_scale": 0, "weight_zero_point": 0, "weight_shape": 0, "other": 0}
    for name, t in state.items():
        kind = name.rsplit(".", 1)[-1]
        kinds[kind if kind in kinds else "other"] += t.numel() * t.element_size()
    quantized = kinds["weight_packed"] + kinds["weight_scale"] + kinds["weight_zero_point"]
    scale_bits = 8 * next(iter(src.matrices.values())).grid.scale.element_size()
    return {"matrices": len(src.matrices), "account": acct.to_dict(), "account_bytes": acct.bytes,
            "quantized_tensor_bytes": quantized, "tensor_bytes": kinds, "scale_bits_on_disk": scale_bits,
            "matches_account": quantized == acct.bytes}


def write(src: Source, tmp: Path) -> dict[str, Any]:
    """Write the checkpoint into the (empty, temporary) directory ``tmp``; returns the byte account."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import save_file

    from pare.io.outdir import SAVE_FILES

    fit_grids(src, "compressed-tensors holds only matrices on one integer grid")
    scheme = _scheme(src)
    state = _packed(src)
    _verify(src, state, scheme)
    quantized = {k[: -len(".weight")] for k in src.matrices}
    ignore = sorted(n for n in _linear_names(src) if n not in quantized)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name in sorted(SAVE_FILES - {"pare.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}):
        if (src.path / name).is_file():
            shutil.copyfile(src.path / name, tmp / name)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 quantization_status="compressed", ignore=ignore)
    ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
    account = _account(src, state)
    account["file_bytes"] = (tmp / "model.safetensors").stat().st_size
    account["unquantized_linears"] = ignore
    if src.quant is not None and src.manifest is not None:
        account["manifest_account"] = _manifest_account(src.manifest)
    return account


def _manifest_account(manifest: dict[str, Any]) -> dict[str, Any] | None:
    from pare.io.save import manifest_stages

    for stage in manifest_stages(manifest)[::-1]:
        q = (stage.get("scores") or {}).get("quantization")
        if isinstance(q, dict):
            return {k: q.get(k) for k in ("sparse_format", "bytes", "bits_per_param")}
    return None
