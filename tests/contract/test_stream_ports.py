"""``stream_ports`` is the one list of a layer's readers and writers of the residual stream: a
hidden-size cut changes exactly those (plus the norms), SliceGPT's writers come from it, and width
importance scores its projections."""

from __future__ import annotations

import pytest
import torch

from pare.arch import describe
from pare.arch.residual import stream_ports, writers_of
from pare.arch.surgery.width import prune_hidden
from tiny import ALL_TINY_ARCHS, tiny_model


def _stream_side(arch, model) -> set[str]:
    """Every layer parameter whose hidden-size side the ports name (norms included)."""
    names = set()
    for i, roles in enumerate(arch.layers):
        prefix = arch.layer_prefix(i)
        layer = arch.layer_modules(model)[i]
        for port in stream_ports(roles):
            names.add(f"{prefix}.{port.path}.{port.param}")
            bias = getattr(layer.get_submodule(port.path), "bias", None)
            if port.role == "writer" and port.sort == "proj" and isinstance(bias, torch.Tensor):
                names.add(f"{prefix}.{port.path}.bias")
        for norm in roles.norms:
            names.update(f"{prefix}.{norm}.{n}" for n, _ in layer.get_submodule(norm).named_parameters())
    return names


@pytest.mark.parametrize("arch_name", ALL_TINY_ARCHS)
def test_a_hidden_cut_changes_exactly_the_stream_ports_and_norms(arch_name: str) -> None:
    model = tiny_model(arch_name)
    arch = describe(model)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    before = {k: tuple(v.shape) for k, v in model.named_parameters() if k.startswith(arch.layers_path + ".")}
    expected = _stream_side(arch, model)
    try:
        prune_hidden(model, arch, torch.arange(hidden - 8))
    except Exception as exc:  # families a hidden cut refuses say so; the list still has to match below
        pytest.skip(f"{arch_name}: a hidden cut is refused ({exc})")
    after = {k: tuple(v.shape) for k, v in model.named_parameters() if k in before}
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == expected


@pytest.mark.parametrize("arch_name", ["llama", "mixtral", "qwen2_moe", "gpt2"])
def test_writers_are_the_ports_that_write(arch_name: str) -> None:
    model = tiny_model(arch_name)
    arch = describe(model)
    for i, roles in enumerate(arch.layers):
        ports = [p for p in stream_ports(roles) if p.role == "writer"]
        assert [w.module for w in writers_of(arch, i)] == [f"{arch.layer_prefix(i)}.{p.path}" for p in ports]
        assert {p.block for p in ports} <= {"attention", "mlp", "experts", "shared"}
