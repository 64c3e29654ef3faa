"""``pare export DIR --format compressed-tensors|gguf --out OUT``: a real, smaller checkpoint of a saved model."""

from __future__ import annotations

import argparse
import json

from pare.io.export import FORMATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``export`` on the ``pare`` sub-parsers."""
    p = sub.add_parser(
        "export", allow_abbrev=False,
        help="write a saved (quantized) model as a real low-bit checkpoint: compressed-tensors or GGUF",
        description="Write a model saved by pare as a checkpoint that stores its codes: compressed-tensors "
                    "(pack-quantized int8/int4..., loads with from_pretrained) or one GGUF file for llama.cpp "
                    "(Q8_0 / Q4_0 from pare's int8 / int4 grids, F16 / BF16 / F32 otherwise). The exported model "
                    "computes exactly what the saved fake-quantized one does.")
    p.add_argument("model", help="directory written by pare prune / quantize / run")
    p.add_argument("--format", dest="fmt", required=True, choices=FORMATS, help="checkpoint format")
    p.add_argument("--out", required=True, help="output directory (compressed-tensors) or FILE.gguf")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--gguf-type", default=None,
                   help="gguf: type of unquantized matrices (f16, bf16, f32; default: the model's dtype)")
    p.add_argument("--json", action="store_true", help="print the export record as JSON")
    p.add_argument("-v", "--verbose", action="store_true")


def export_cmd(args: argparse.Namespace) -> int:
    """Run the export and print what was written."""
    from pare.io.export import export

    record = export(args.model, args.fmt, args.out, overwrite=args.overwrite, gguf_type=args.gguf_type)
    if args.json:
        print(json.dumps(record, indent=2, default=str))
        return 0
    print(f"wrote {record['out']} ({args.fmt}, {record['file_bytes']:,} bytes of weights)")
    if "account_bytes" in record:
        print(f"  {record['matrices']} quantized matrices: {record['quantized_tensor_bytes']:,} bytes of codes, scales "
              f"and zero points; pare's bits account: {record['account_bytes']:,} bytes"
              + ("" if record["matches_account"] else
                 f" (scales stored in {record['scale_bits_on_disk']} bits, the account counts 16)"))
    if "tensor_types" in record:
        types = ", ".join(f"{n} {k}" for k, n in sorted(record["tensor_types"].items()))
        print(f"  tensors: {types}; tokenizer {'included' if record['tokenizer'] else 'not included'}")
    return 0
