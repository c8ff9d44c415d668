#!/usr/bin/env python3
"""Regenerates smollm2_tokenizer_cases.json: reference token ids for the SmolLM2
GGUF tokenizer, produced by Hugging Face `tokenizers` (an implementation
independent of ours).

The BPE model is built from the vocabulary and merges stored in the GGUF file,
with the pre-tokenizer and decoder SmolLM2's tokenizer.json declares:
  Sequence[Digits(individual_digits=true), ByteLevel(add_prefix_space=false)]
and the control tokens registered as special added tokens.

Usage:
  pip install tokenizers gguf
  python3 tests/reference/make_tokenizer_fixture.py \
      [--model ~/.cache/inferlab/models/SmolLM2-135M-Instruct.Q4_1.gguf] \
      [--out tests/reference/smollm2_tokenizer_cases.json]
"""
import argparse
import json
import os
import pathlib

import gguf
import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

CONTROL = 3
USER_DEFINED = 4

CASES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "3.14",
    "pi is 3.14159 and e is 2.71828; 1,000,000.00 dollars, 1e-5, 0x1F",
    "I'm sure you'll see they've done it, isn't it? We'd go. She's here.",
    "'s 't 're 've 'm 'll 'd 'S 'LL",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple    spaces   between words",
    " ",
    "line one\nline two\n\nline four\n",
    "\n\n\n",
    "\r\n windows line \r\n",
    "tab\tseparated\tvalues\t\t",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'int main() { printf("%d\\n", 42); return 0; }',
    "    indented code\n\tand a tab\n        deeper",
    "naïve café résumé Zürich",
    "日本語のテキスト、中文文本。",
    "emoji: 😀👍🏽 🇺🇸 family: 👨\u200d👩\u200d👧",
    "Привет, мир! Ελληνικά",
    "مرحبا بالعالم",
    "combining: e\u0301 a\u0308 n\u0303",
    "unicode digits: ١٢٣ ½ ² ⅷ",
    "nbsp\u00a0here and\u2003em space",
    # U+180E is not White_Space for HF (Oniguruma) but is \s for PCRE2; U+0085 is.
    "vowel\u180e separator \u180e\u180e next\u0085line",
    "URL: https://example.com/path?q=1&x=y#frag, email@example.org",
    "---===***!!!??? ... ;;",
    "CAPS LOCK and MiXeD CaSe",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more<|im_start|",
    "In 1969, Apollo 11 landed on the Moon. The mission lasted 8 days, 3 hours "
    "and 18 minutes.",
]


def read_vocab(path):
    reader = gguf.GGUFReader(path)

    def field(key):
        return reader.fields[key]

    def strings(key):
        f = field(key)
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key):
        f = field(key)
        return f.parts[f.data[0]][0]

    model = bytes(field("tokenizer.ggml.model").parts[-1]).decode()
    pre = bytes(field("tokenizer.ggml.pre").parts[-1]).decode()
    assert model == "gpt2", model
    assert pre == "smollm", pre
    tokens = strings("tokenizer.ggml.tokens")
    merges = strings("tokenizer.ggml.merges")
    f = field("tokenizer.ggml.token_type")
    types = [int(f.parts[i][0]) for i in f.data]
    return tokens, types, merges


def build_tokenizer(tokens, types, merges):
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types) if ty == CONTROL]
    tok.add_special_tokens(specials)
    added = [AddedToken(t, special=False, normalized=False)
             for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if added:
        tok.add_tokens(added)
    return tok


def main():
    default_dir = os.environ.get("INFERLAB_MODEL_DIR",
                                 os.path.expanduser("~/.cache/inferlab/models"))
    here = pathlib.Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(default_dir, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=str(here / "smollm2_tokenizer_cases.json"))
    args = ap.parse_args()

    tokens, types, merges = read_vocab(args.model)
    tok = build_tokenizer(tokens, types, merges)
    cases = []
    for text in CASES:
        ids = tok.encode(text, add_special_tokens=False).ids
        # The ByteLevel decoder drops nothing, so every case must round-trip.
        assert tok.decode(ids, skip_special_tokens=False) == text, text
        cases.append({"text": text, "ids": ids})

    fixture = {
        "model_file": os.path.basename(args.model),
        "vocab_size": len(tokens),
        "generator": "tests/reference/make_tokenizer_fixture.py, tokenizers "
                     + tokenizers.__version__,
        "add_bos": False,
        "parse_special": True,
        "cases": cases,
    }
    # One case per line keeps the fixture reviewable in a diff.
    header = {k: v for k, v in fixture.items() if k != "cases"}
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]
    text = json.dumps(header, ensure_ascii=False, indent=1)[:-2]
    text += ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"
    json.loads(text)
    with open(args.out, "w", encoding="utf-8") as out:
        out.write(text)
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
