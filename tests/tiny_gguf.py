"""A tiny Llama GGUF written with the ``gguf`` package, for the tests of ``vcrd fetch-model`` and the
real-tokenizer path: 2 layers, hidden 16, 4 heads / 2 KV heads, a byte-level BPE vocabulary (3 special
tokens, the 256 byte symbols, 4 merges) and SmolLM2's chat template, F32 tensors (tied embeddings).

The weights are returned in Hugging Face's layout; the q/k projections are written permuted the way
llama.cpp's converter writes them, so a loader that forgets to undo the permutation gives other logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: unk, bos, eos (= pad, as SmolLM2)
MERGES = ["Ċ Ċ", "t h", "th e", "Ġ the"]  # "\n\n", "th", "the", " the": ids 259, 260, 261, 262
CONFIG = dict(hidden=16, layers=2, heads=4, kv_heads=2, ffn=32, context=128, eps=1e-5, rope_theta=10000.0)


def byte_symbols():
    """GPT-2's byte → printable-symbol table (the byte-level BPE alphabet), written out independently."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def vocabulary():
    """Token strings by id: the specials, the 256 byte symbols in byte order (id = 3 + byte), the merges."""
    symbols = byte_symbols()
    return SPECIALS + [symbols[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]


def build_tokenizer():
    """The same tokenizer built in memory with ``tokenizers`` (no GGUF): byte-level BPE over :func:`vocabulary`
    with :data:`MERGES`, SmolLM2's special tokens (BOS ``<|im_start|>``, EOS = pad ``<|im_end|>``) and chat
    template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary())}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in MERGES]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf`` permutation of a q/k projection (rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0) -> Dict[str, np.ndarray]:
    """Write the tiny model to ``path``; return its weights by Hugging Face name (un-permuted)."""
    import gguf

    c = CONFIG
    vocab = vocabulary()
    V, H, F, hd = len(vocab), c["hidden"], c["ffn"], c["hidden"] // c["heads"]
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(c["context"])
    w.add_embedding_length(H)
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(F)
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (V - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    hf: Dict[str, np.ndarray] = {"model.embed_tokens.weight": rand(V, H), "model.norm.weight": 1 + rand(H, scale=0.1)}
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        layer = {"input_layernorm.weight": 1 + rand(H, scale=0.1), "self_attn.q_proj.weight": rand(H, H),
                 "self_attn.k_proj.weight": rand(c["kv_heads"] * hd, H),
                 "self_attn.v_proj.weight": rand(c["kv_heads"] * hd, H),
                 "self_attn.o_proj.weight": rand(H, H),
                 "post_attention_layernorm.weight": 1 + rand(H, scale=0.1),
                 "mlp.gate_proj.weight": rand(F, H), "mlp.up_proj.weight": rand(F, H),
                 "mlp.down_proj.weight": rand(H, F)}
        hf.update({p + k: v for k, v in layer.items()})
        names = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
        for k, name in names.items():
            value = layer[k]
            if k == "self_attn.q_proj.weight":
                value = llama_cpp_permute(value, c["heads"])
            elif k == "self_attn.k_proj.weight":
                value = llama_cpp_permute(value, c["kv_heads"])
            w.add_tensor(f"blk.{i}.{name}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf
