"""Tiny random causal LMs of every supported family, built offline from configs (seconds on CPU)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

VOCAB = 128

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB)
_GQA = dict(_COMMON, num_key_value_heads=2)

TINY_SPECS: dict[str, dict] = {
    "llama": dict(_GQA, max_position_embeddings=256),
    "mistral": dict(_GQA, max_position_embeddings=256, sliding_window=None),
    "qwen2": dict(_GQA, max_position_embeddings=256),
    "qwen3": dict(_GQA, head_dim=16, max_position_embeddings=256),
    "gemma2": dict(_GQA, head_dim=16, max_position_embeddings=256, sliding_window=8),
    "gemma3_text": dict(_GQA, head_dim=16, max_position_embeddings=256, sliding_window=8),
    "phi3": dict(_GQA, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(_COMMON, max_position_embeddings=256),
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=0, eos_token_id=0),
    "opt": dict(
        hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB,
        word_embed_proj_dim=64, max_position_embeddings=256,
    ),
    "mixtral": dict(_GQA, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        _GQA, moe_intermediate_size=32, shared_expert_intermediate_size=48, max_position_embeddings=256,
        num_experts=4, num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        _GQA, head_dim=16, moe_intermediate_size=32, max_position_embeddings=256, num_experts=4,
        num_experts_per_tok=2,
    ),
}
TINY_ARCHS = tuple(TINY_SPECS)

EXTRA_SPECS: dict[str, dict] = {
    # families outside the foundation table whose decoder layers still return tuples
    "gptj": dict(n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=256, vocab_size=VOCAB),
    "bloom": dict(hidden_size=64, n_layer=3, n_head=4, vocab_size=VOCAB),
    "falcon": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB,
                   new_decoder_architecture=False, multi_query=True),
}
_MLA = dict(
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=256, kv_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1,
)
EXTRA_SPECS.update({
    # multi-head latent attention; layer 0 dense, then routed + shared experts
    "deepseek_v2": dict(_MLA, q_lora_rank=None),  # q_proj, greedy routing
    "deepseek_v3": dict(_MLA, q_lora_rank=32, n_group=2, topk_group=1),  # q_a/q_b, group-limited routing
})
ALL_TINY_ARCHS = TINY_ARCHS + tuple(EXTRA_SPECS)
"""The 13 table families plus GPT-J, Bloom, Falcon and DeepSeek-V2/V3: the contract matrix's architectures."""


def tiny_config(model_type: str, **overrides):
    spec = TINY_SPECS.get(model_type) or EXTRA_SPECS[model_type]
    return AutoConfig.for_model(model_type, **{**spec, **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A random model of ``model_type`` in fp32 eval mode; weights scaled so activations stay sane."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 0.08)
    return model.eval()


def tiny_batch(n: int = 2, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


_TEXT = (
    "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog. "
    "One day the sun was bright and the birds sang. The dog ran to the tree and barked at a cat. "
    "Lily laughed and said hello to her friend Tom, who had a red ball and a big blue kite. "
)


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A BPE tokenizer trained offline on a few sentences; every id is below ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([_TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def tiny_text(repeats: int = 40) -> str:
    return "\n\n".join([_TEXT] * repeats)
