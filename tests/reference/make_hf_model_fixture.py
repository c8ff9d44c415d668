#!/usr/bin/env python3
"""Tiny Hugging Face checkpoints written by transformers, with their logits.

For tests/unit/test_hf_checkpoint.cpp: each folder under tests/reference/hf_models/
is what `save_pretrained` writes (config.json, safetensors weights, the tokenizer
files copied from tests/reference/hf_tokenizers/), random weights at a small
shape (2 layers, 4 query heads over 2 KV heads of 8 dims, hidden 32, FFN 64):

  llama          LlamaForCausalLM, F16 weights, byte-level tokenizer (Llama-3 regex)
  llama-sharded  LlamaForCausalLM with attention_bias (Q/K/V/O biases), F32,
                 saved in three shards with model.safetensors.index.json
  qwen2          Qwen2ForCausalLM (Q/K/V biases), tied embeddings, BF16,
                 vocab_size padded past the tokenizer as Qwen does
  mistral        MistralForCausalLM, sliding_window 64, F16, SentencePiece-style
                 byte-fallback tokenizer
  llama31        LlamaForCausalLM with Llama 3.1's RoPE scaling (rope_type llama3,
                 factor 8, original context 16 so that every band of the rule is hit), F32

and three GGUF conversions of the same weights (llama.gguf and llama31.gguf with
Q/K rows permuted as llama.cpp's converter permutes them, llama31's scaling as
the rope_freqs.weight divisors llama.cpp writes; qwen2.gguf unpermuted, NeoX
RoPE), F16/F32, with the tokenizer as GGUF metadata.

hf_models_logits.json holds, per model and prompt, the token ids (the HF
tokenizer's, special tokens added), transformers' float32 logits of some rows
and its greedy continuation. Weights are drawn with a larger spread than the
default initializer so that logits are far from uniform.

Usage (venv from scripts/setup-reference-lora.sh):
  .venv-lora/bin/python tests/reference/make_hf_model_fixture.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

try:
    import gguf
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)
except ImportError as e:  # pragma: no cover
    raise SystemExit(f"make_hf_model_fixture: {e}; run scripts/setup-reference-lora.sh and use .venv-lora/bin/python")

HERE = Path(__file__).resolve().parent
OUT = HERE / "hf_models"
TOKENIZERS = HERE / "hf_tokenizers"

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5,
             rope_theta=10000.0)

PROMPTS = [
    "The old mill stands by the river, and every morning the baker lights his oven.",
    "Lanterns glow along the narrow street; two owls watch the barn from the oak.",
]
# Longer than mistral's window (64): the reference for sliding-window attention.
LONG_PROMPT = " ".join(["A red boat is tied to the wooden pier near the market square."] * 4)
KEPT_ROWS = 6      # logits kept: the first row, the last rows, and rows in between
GREEDY_STEPS = 8


def randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in ** 0.5))


def kept_rows(n: int) -> list[int]:
    rows = sorted({0, n // 3, n // 2, n - 3, n - 2, n - 1})
    return [r for r in rows if 0 <= r < n][:KEPT_ROWS]


def reference(model, tokenizer, texts):
    cases = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
            seq = list(ids)
            for _ in range(GREEDY_STEPS):
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                seq.append(nxt)
        rows = kept_rows(len(ids))
        cases.append({"text": text, "ids": ids, "rows": rows,
                      "logits": [[round(float(v), 6) for v in logits[r]] for r in rows],
                      "greedy": seq[len(ids):]})
    return cases


def permute_for_gguf(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf permutation: each head's halves interleaved into pairs.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, arch: str, model, config, tokenizer_dir: Path, dtype) -> None:
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tcfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    special = {}
    for t in tok["added_tokens"]:
        vocab[t["content"]] = t["id"]
        special[t["id"]] = t["special"]
    tokens = ["[PAD%d]" % i for i in range(config.vocab_size)]
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED) if i in special \
            else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(SHAPE["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe" if arch == "llama" else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    def token_id(key):
        v = tcfg.get(key)
        if isinstance(v, dict):
            v = v["content"]
        return vocab.get(v) if v is not None else None

    if token_id("bos_token") is not None:
        w.add_bos_token_id(token_id("bos_token"))
    if token_id("eos_token") is not None:
        w.add_eos_token_id(token_id("eos_token"))
    w.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))

    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    h, hkv = config.num_attention_heads, config.num_key_value_heads

    def tensor(name, value):
        value = value.astype(dtype) if value.ndim == 2 else value.astype(np.float32)
        w.add_tensor(name, value)

    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":  # llama.cpp's form: default inverse frequencies / scaled ones
        dim = config.head_dim
        base = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaled = model.model.rotary_emb.inv_freq.float()
        w.add_tensor("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))
    tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    tensor("output_norm.weight", sd["model.norm.weight"])
    if not config.tie_word_embeddings:
        tensor("output.weight", sd["lm_head.weight"])
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = permute_for_gguf(q, h), permute_for_gguf(k, hkv)
        tensor(f"blk.{l}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        tensor(f"blk.{l}.attn_q.weight", q)
        tensor(f"blk.{l}.attn_k.weight", k)
        tensor(f"blk.{l}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        tensor(f"blk.{l}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        if p + "self_attn.q_proj.bias" in sd:
            for x in "qkv":
                tensor(f"blk.{l}.attn_{x}.bias", sd[p + f"self_attn.{x}_proj.bias"])
        tensor(f"blk.{l}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        tensor(f"blk.{l}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        tensor(f"blk.{l}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        tensor(f"blk.{l}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build(name, cls, cfg_cls, tokenizer, dtype, seed, extra, shard=None):
    tok_dir = TOKENIZERS / tokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    n_tokens = len(tok)
    config = cfg_cls(vocab_size=extra.pop("vocab_size", n_tokens), **SHAPE, **extra,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed)
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    model.to(dtype).save_pretrained(str(out), max_shard_size=shard or "1GB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out / f)
    (out / "generation_config.json").unlink(missing_ok=True)
    # The reference is what transformers computes from the folder in float32: the
    # stored (rounded) weights, and RoPE frequencies made afresh (a model moved to
    # f16 and back carries f16-rounded inv_freq buffers).
    model = cls.from_pretrained(str(out), dtype=torch.float32).eval()
    texts = PROMPTS + ([LONG_PROMPT] if name == "mistral" else [])
    return model, config, tok_dir, reference(model, tok, texts)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    fixtures = {}
    llama, llama_cfg, llama_tok, fixtures["llama"] = build(
        "llama", LlamaForCausalLM, LlamaConfig, "bytelevel-llama3", torch.float16, 11, {})
    _, _, _, fixtures["llama-sharded"] = build(
        "llama-sharded", LlamaForCausalLM, LlamaConfig, "bytelevel-llama3", torch.float32, 12,
        {"attention_bias": True}, shard="40KB")
    qwen, qwen_cfg, qwen_tok, fixtures["qwen2"] = build(
        "qwen2", Qwen2ForCausalLM, Qwen2Config, "bytelevel-qwen2", torch.bfloat16, 13,
        {"tie_word_embeddings": True, "vocab_size": 392})
    _, _, _, fixtures["mistral"] = build(
        "mistral", MistralForCausalLM, MistralConfig, "spm-llama2", torch.float16, 14, {"sliding_window": 64})
    llama31, llama31_cfg, _, fixtures["llama31"] = build(
        "llama31", LlamaForCausalLM, LlamaConfig, "bytelevel-llama3", torch.float32, 15,
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})
    write_gguf(OUT / "llama.gguf", "llama", llama, llama_cfg, llama_tok, np.float16)
    write_gguf(OUT / "llama31.gguf", "llama", llama31, llama31_cfg, llama_tok, np.float32)
    write_gguf(OUT / "qwen2.gguf", "qwen2", qwen, qwen_cfg, qwen_tok, np.float32)
    (HERE / "hf_models_logits.json").write_text(json.dumps(fixtures, separators=(",", ":")) + "\n")
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(HERE)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
