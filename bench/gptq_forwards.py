"""GPTQ's layer forwards and CPU time, two-pass against ``true_sequential``, on a random-weight model
with SmolLM2-135M's layer shapes (no checkpoint needed): one JSON line.

Usage: ``python bench/gptq_forwards.py [--layers 3] [--nsamples 32] [--seqlen 256]``
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pare
from pare.methods.quantize import QuantizeConfig


def main(a: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=a.layers, vocab_size=49152, tie_word_embeddings=True)
    ids = torch.randint(0, cfg.vocab_size, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    out: dict = {"layers": a.layers, "nsamples": a.nsamples, "seqlen": a.seqlen}
    for name, true_seq, batch in (("two_pass_b8", False, 8), (f"two_pass_b{a.nsamples}", False, a.nsamples),
                                  (f"true_sequential_b{a.nsamples}", True, a.nsamples)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        calls = [0]
        handles = [layer.register_forward_pre_hook(lambda *_, c=calls: c.__setitem__(0, c[0] + 1))
                   for layer in model.model.layers]
        c0 = time.process_time()
        try:
            pare.prune(model, QuantizeConfig(scheme="int4", group_size=64, algorithm="gptq", act_order=True,
                                             true_sequential=true_seq),
                       ids, runtime=pare.RuntimeConfig(device="cpu", progress=False), batch_size=batch)
        finally:
            for h in handles:
                h.remove()
        out[name] = {"cpu_seconds": round(time.process_time() - c0, 2), "layer_forwards": calls[0]}
    print(json.dumps(out), flush=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    return p.parse_args()


if __name__ == "__main__":
    main(parse())
