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
    "tiny-llama": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=320,
            max_position_embeddings=2048,
        ),
    ),
    "tiny-llama-wide": (
        "LlamaConfig",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=320,
            max_position_embeddings=2048,
        ),
    ),
    "tiny-llama-deep": (  # GPU tests: a step of many small kernels, ~10x tiny-llama's on a GPU
        "LlamaConfig",
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=320,
            max_position_embeddings=4096,
        ),
    ),
    "tiny-qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=320,
            max_position_embeddings=2048,
        ),
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=True,
            head_dim=64,
        ),
    ),
    "llama-3.1-8b": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
    ),
    # all-MiniLM-L6-v2's shape (the offline router backbone), as a 2-label classifier for
    # router-overhead benchmarks with random weights
    "minilm-l6": (
        "BertConfig",
        dict(
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=6,
            num_attention_heads=12,
            vocab_size=30522,
            max_position_embeddings=512,
        ),
    ),
    "llama-3.1-70b": (
        "LlamaConfig",
        dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
    ),
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


def random_causal_lm(
    name: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    init_std: float | None = None,
):
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
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"<x{i}>"] = len(vocab)
        i += 1
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.Sequence([decoders.Replace(Regex(r"^<x\d+>$"), "x"), decoders.ByteLevel()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        bos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<extra_0>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _byte_of_char(c: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one char."""
    o = ord(c)
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    if o in printable:
        return o
    others = [b for b in range(256) if b not in printable]
    return others[o - 256]


def write_tiny_gguf(path, name: str = "tiny-llama", seed: int = 0):
    """Write a random-weight model at a Llama shape, with the byte tokenizer, as a float32 GGUF file.

    What llama.cpp loads in tests: the same weights as `random_causal_lm(name, seed)` (q/k
    rows permuted into GGML's rope layout, as llama.cpp's converter does), the byte
    tokenizer's vocabulary and ChatML template. Returns (path, the HF model, the tokenizer),
    so a test can compare llama.cpp against transformers on identical weights.
    """
    from pathlib import Path

    import gguf
    import numpy as np

    model = random_causal_lm(name, seed=seed, dtype=torch.float32)
    cfg = model.config
    if cfg.model_type != "llama":
        raise ValueError(f"write_tiny_gguf writes Llama shapes; {name!r} is {cfg.model_type}")
    tok = byte_tokenizer(vocab_size=cfg.vocab_size)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    # llama.cpp's BPE loader needs at least one merge, and transformers' GGUF reader needs the
    # merged token in the vocabulary: the last padding id becomes "ĠĠ" (two spaces) in the file.
    tokens[-1] = "ĠĠ"
    specials = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(["Ġ Ġ"])
    w.add_token_scores([0.0] * len(tokens))  # transformers' GGUF tokenizer reader wants them
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    def permute(t: torch.Tensor, heads: int) -> torch.Tensor:  # HF rotate-half rows -> GGML interleaved
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for key, t in sd.items():
        if key in names:
            out = names[key]
        else:
            parts = key.split(".")  # model.layers.{i}.{module...}.weight
            out = f"blk.{parts[2]}.{per_layer['.'.join(parts[3:-1])]}.{parts[-1]}"
            if key.endswith("q_proj.weight"):
                t = permute(t, n_head)
            elif key.endswith("k_proj.weight"):
                t = permute(t, n_kv)
        w.add_tensor(out, np.ascontiguousarray(t.numpy(), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model, tok
