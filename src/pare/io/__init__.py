"""Save and load pruned models: safetensors + config + tokenizer + the ``pare.json`` manifest."""

from pare.io.load import load, read_manifest
from pare.io.save import MANIFEST, save

__all__ = ["MANIFEST", "load", "read_manifest", "save"]
