"""Random-weight models at named shapes, and an offline byte-level tokenizer.

Tests build tiny models from real transformers configs (2 layers, hidden 64) and
systems benchmarks build real shapes (Llama-3.2-1B, Llama-3.1-8B, Llama-3.1-70B) with
random weights; neither needs a download. `byte_tokenizer` is a real byte-level BPE
tokenizer (256 byte tokens, no merges, a ChatML template) padded to the model's
vocabulary so any sampled id decodes.
"""

from __future__ import annotations

from typing import Any

import torch

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>", "<pad>"]

# name -> (config class name, kwargs). Tiny shapes are for tests; real shapes for benchmarks.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                       max_position_embeddings=2048)),
    "tiny-llama-wide": ("LlamaConfig", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                            max_position_embeddings=2048)),
    "tiny-qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                       max_position_embeddings=2048)),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         max_position_embeddings=8192, rope_theta=500000.0,
                                         tie_word_embeddings=True, head_dim=64)),
    "llama-3.1-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         max_position_embeddings=8192, rope_theta=500000.0)),
    # all-MiniLM-L6-v2's shape (the offline router backbone), as a 2-label classifier for
    # router-overhead benchmarks with random weights
    "minilm-l6": ("BertConfig", dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                     num_attention_heads=12, vocab_size=30522, max_position_embeddings=512)),
    "llama-3.1-70b": ("LlamaConfig", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                          max_position_embeddings=8192, rope_theta=500000.0)),
}


def shape_config(name: str, **overrides: Any):
    """A transformers config for a named shape."""
    import transformers

    if name not in SHAPES:
        raise ValueError(f"unknown random shape {name!r}; known: {', '.join(SHAPES)}")
    cls_name, kwargs = SHAPES[name]
    cfg = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    cfg.pad_token_id = SPECIAL_TOKENS.index("<pad>") + 256
    cfg.eos_token_id = SPECIAL_TOKENS.index("<|im_end|>") + 256
    cfg.bos_token_id = SPECIAL_TOKENS.index("<|endoftext|>") + 256
    return cfg


def random_causal_lm(name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", init_std: float | None = None):
    """A random-weight causal LM at a named shape, built directly on `device`."""
    from transformers import AutoModelForCausalLM

    cfg = shape_config(name)
    if init_std is not None:
        cfg.initializer_range = init_std
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def byte_tokenizer(vocab_size: int = 320):
    """A real byte-level BPE tokenizer (no merges) with ChatML specials, padded to vocab_size.

    The padding ids (`<xN>`, most of a real-shape vocabulary) decode to "x", one byte, so a
    step of random-weight tokens re-tokenizes to as many tokens as were generated, as text
    does with a model's own tokenizer (decoded literally, each would become ~6 byte tokens
    and a chain's context would grow ~6x faster than it does in real use).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    # The ByteLevel alphabet is a set of 256 chars; order them by the byte they stand for.
    chars = sorted(byte_to_char, key=_byte_of_char)
    vocab = {c: i for i, c in enumerate(chars)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"<x{i}>"] = len(vocab)
        i += 1
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.Sequence([decoders.Replace(Regex(r"^<x\d+>$"), "x"), decoders.ByteLevel()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>", bos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<extra_0>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _byte_of_char(c: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one char."""
    o = ord(c)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    if o in printable:
        return o
    others = [b for b in range(256) if b not in printable]
    return others[o - 256]
