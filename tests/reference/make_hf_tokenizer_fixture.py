#!/usr/bin/env python3
"""Writes three small Hugging Face tokenizer folders and their golden cases.

Tokenizers built and trained here with Hugging Face `tokenizers` (an implementation
independent of ours), on a short text in this file, so nothing is downloaded:

  hf_tokenizers/bytelevel-llama3/  byte-level BPE; pre_tokenizer Sequence[Split(Llama-3
      regex, Isolated), ByteLevel(use_regex=false)]; model.ignore_merges true; BOS <s>
      added by a TemplateProcessing post-processor (add_bos_token true in the config).
  hf_tokenizers/bytelevel-qwen2/   byte-level BPE; normalizer NFC; Sequence[Split(Qwen2
      regex, Isolated), ByteLevel(use_regex=false)]; no BOS (bos_token null).
  hf_tokenizers/spm-llama2/        Llama-2 / Mistral style: BPE over Unicode characters,
      byte_fallback, <unk> <s> </s> at ids 0 1 2 then the 256 <0xHH> tokens; normalizer
      Sequence[Prepend("▁"), Replace(" ", "▁")]; decoder Sequence[Replace("▁", " "),
      ByteFallback, Fuse, Strip(1, 0)]; merges written as "a b" strings, as Llama-2's
      file has them (the byte-level folders use the [a, b] pairs tokenizers 0.23 writes).

Each folder has tokenizer.json and tokenizer_config.json (bos/eos tokens, add_bos_token,
a short chat_template). Every tokenizer has the special added tokens <|im_start|> and
<|im_end|> (and its own BOS/EOS) and one non-special added token, <tool>.

Four variants reuse a folder with other top-level tokenizer.json entries ("overrides"; the
C++ test writes the same file): spm-metaspace (pre_tokenizer Metaspace, prepend_scheme
"first", no normalizer, as newer Llama/Mistral conversions write it), spm-metaspace-split
(Metaspace "always", split), bytelevel-smollm (Digits(individual_digits) + ByteLevel with
the GPT-2 regex, as SmolLM has it) and bytelevel-gpt2 (ByteLevel alone, add_prefix_space).

hf_tokenizer_cases.json then holds, per tokenizer, 36 texts with
  ids:       encode(text, add_special_tokens=True)   (BOS where the tokenizer adds one)
  ids_plain: encode(text, add_special_tokens=False)
  decoded / decoded_plain: decode(those ids, skip_special_tokens=False)
The C++ test is tests/unit/test_hf_tokenizer.cpp.

Usage: .venv-lora/bin/python tests/reference/make_hf_tokenizer_fixture.py
(venv from scripts/setup-reference-lora.sh; only `tokenizers` is needed, `transformers`
is used, when present, to check that AutoTokenizer loads each folder to the same ids).
Developer-time only: ctest reads the committed files. The output is deterministic:
rerunning it must leave `git status` clean.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
    processors, trainers

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "hf_tokenizers"
CASES_FILE = HERE / "hf_tokenizer_cases.json"
VOCAB_SIZE = 384

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The training text: English prose, a little code and numbers, a few accented words.
# No CJK, emoji or Greek, so that those fall back to bytes in spm-llama2.
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran away.
In the beginning there was the word, and the word was with the writer of this little text.
We train three small tokenizers on these lines so that the tests need no download at all.
Hello world! Hello there, how are you today? I'm fine, thank you; we're all fine here.
They've said it before and they'll say it again: it's the tokenizer that matters, isn't it?
def main(argv):
    for index in range(10):
        print("value", index * 2, argv[index])
    return 0
Numbers: 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 42 and 65536 bytes in 64 KiB.
A caf\u00e9 in the old town sells cr\u00e8me br\u00fbl\u00e9e to tourists from Z\u00fcrich and M\u00fcnchen.
Tabs\tand  double  spaces   appear   here, with new lines

between paragraphs of the text.
Questions? Answers! Quotes: "yes" and 'no'. Brackets (round) [square] {curly} <angle>.
the the the and and and of of of to to to in in in is is is that that that with with
"""

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                 "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Texts every tokenizer is checked on; {bos} {eos} become that tokenizer's own tokens.
CASES = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "multiple   spaces   between   words",
    " ",
    "   ",
    "tabs\tand\ttabs\t\t",
    "line one\nline two\n\nline four\n",
    "\n\n\n",
    "\r\n windows line \r\n",
    "   \n  \t ",
    "12345 67890 3.14159 1,000,000",
    "The year 2024 had 366 days.",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 Z\u00fcrich",
    "\u00dcn\u00efc\u00f6d\u00e9 \u00c0\u00c9\u00ce\u00d5\u00dc",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u4e2d\u6587\u6d4b\u8bd5\u3002",
    "emoji \U0001F600\U0001F389\U0001F44D\U0001F3FD",
    "\u03a9mega \u2211 \u222b \u221a \u221e \u03b1\u03b2\u03b3",
    "math \U0001D518\U0001D52B\U0001D526 \u2135",
    "nbsp\u00a0here and\u2003em space",
    "don't won't I'm we're they've she'll he'd",
    "DON'T SHOUT, WE'LL HEAR",
    "def f(x):\n    return x * 2  # comment\n",
    "~^|`@$%&*_+=\\",
    "{eos}",
    "{bos}Hello{eos}",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|> after a special token",
    "text with <tool> inside and<tool>twice",
    "<tool><tool>",
    "almost special <|im_star|> and < tool>",
    "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    "The quick brown fox jumps over the lazy dog.",
]


def trainer(vocab_size: int, special: list[str], **kwargs) -> trainers.BpeTrainer:
    return trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                               min_frequency=1, **kwargs)


def training_lines() -> list[str]:
    return TRAINING_TEXT.splitlines(keepends=True)


def add_tokens(tok: Tokenizer, special: list[str]) -> None:
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])


def byte_level(regex: str, *, ignore_merges: bool, nfc: bool, special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_added = len(special) + 1
    tok.train_from_iterator(training_lines(), trainer(
        VOCAB_SIZE - n_added, [], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    add_tokens(tok, special)
    return tok


def make_llama3() -> tuple[Tokenizer, dict]:
    tok = byte_level(LLAMA3_REGEX, ignore_merges=True, nfc=False,
                     special=["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                      special_tokens=[("<s>", bos)]),
    ])
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "chat_template": "{{ bos_token }}" + CHAT_TEMPLATE}
    return tok, config


def make_qwen2() -> tuple[Tokenizer, dict]:
    tok = byte_level(QWEN2_REGEX, ignore_merges=False, nfc=True,
                     special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}
    return tok, config


def make_spm_llama2() -> tuple[dict, dict]:
    """tokenizer.json written field by field in the layout of Llama-2's own file."""
    # Trained with a Metaspace pre-tokenizer so that, as in SentencePiece, no merge
    # crosses a word boundary; the folder itself has no pre-tokenizer (Llama-2 has none).
    special = ["<unk>", "<s>", "</s>"]
    n_bytes = 256
    later = ["<|im_start|>", "<|im_end|>", "<tool>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always",
                                                     split=True)
    trained.train_from_iterator(training_lines(), trainer(
        VOCAB_SIZE - n_bytes - len(later), special))
    model = json.loads(trained.to_str())["model"]
    ordered = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(special)}
    for b in range(n_bytes):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in ordered:
        if token not in vocab:
            vocab[token] = len(vocab)
    merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in model["merges"]]

    def added(token: str, is_special: bool) -> dict:
        return {"id": vocab[token] if token in vocab else None, "content": token, "single_word": False,
                "lstrip": False, "rstrip": False, "normalized": False, "special": is_special}

    added_tokens = [added(t, True) for t in special]
    for t in later:
        vocab_id = len(vocab) + len(added_tokens) - len(special)
        entry = added(t, t != "<tool>")
        entry["id"] = vocab_id
        added_tokens.append(entry)
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }

    def added_token_object(content: str) -> dict:  # how older Llama-2 configs spell them
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False}

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added_token_object("<s>"),
              "eos_token": added_token_object("</s>"), "unk_token": added_token_object("<unk>"),
              "pad_token": None, "chat_template": "{{ bos_token }}" + CHAT_TEMPLATE}
    return tokenizer_json, config


METASPACE_FIRST = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
VARIANTS = {
    "spm-metaspace": ("spm-llama2", {"normalizer": None, "pre_tokenizer": METASPACE_FIRST}),
    "spm-metaspace-split": ("spm-llama2", {"normalizer": None, "pre_tokenizer": {
        **METASPACE_FIRST, "prepend_scheme": "always", "split": True}}),
    "bytelevel-smollm": ("bytelevel-qwen2", {"normalizer": None, "pre_tokenizer": {
        "type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}}),
    "bytelevel-gpt2": ("bytelevel-qwen2", {"normalizer": None, "pre_tokenizer": {
        "type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}}),
}


def write_folder(name: str, tokenizer_json: dict, config: dict) -> Path:
    folder = OUT_DIR / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = {**config, "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast",
              "clean_up_tokenization_spaces": False}
    for file, data in (("tokenizer.json", tokenizer_json), ("tokenizer_config.json", config)):
        with open(folder / file, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.write("\n")
    return folder


def token_text(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value["content"] if isinstance(value, dict) else value


def cases_for(tok: Tokenizer, config: dict) -> list[dict]:
    bos = token_text(config, "bos_token") or ""
    eos = token_text(config, "eos_token") or ""
    out = []
    for template in CASES:
        text = template.replace("{bos}", bos).replace("{eos}", eos)
        ids = tok.encode(text, add_special_tokens=True).ids
        plain = tok.encode(text, add_special_tokens=False).ids
        out.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                    "ids_plain": plain, "decoded_plain": tok.decode(plain, skip_special_tokens=False)})
    return out


def check_with_transformers(folder: Path, cases: list[dict]) -> None:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return
    hf = AutoTokenizer.from_pretrained(str(folder))
    for case in cases:
        got = hf(case["text"], add_special_tokens=True)["input_ids"]
        assert got == case["ids"], (folder.name, case["text"], got, case["ids"])


def main() -> None:
    llama3, llama3_config = make_llama3()
    qwen2, qwen2_config = make_qwen2()
    spm_json, spm_config = make_spm_llama2()
    folders = {
        "bytelevel-llama3": (json.loads(llama3.to_str()), llama3_config),
        "bytelevel-qwen2": (json.loads(qwen2.to_str()), qwen2_config),
        "spm-llama2": (spm_json, spm_config),
    }
    entries = {}

    def add_entry(name: str, folder: Path, tok: Tokenizer, config: dict, overrides: dict | None) -> None:
        cases = cases_for(tok, config)
        if overrides is None:
            check_with_transformers(folder, cases)
        size = tok.get_vocab_size(with_added_tokens=True)
        entry = {"folder": f"hf_tokenizers/{folder.name}", "vocab_size": size,
                 "add_bos": bool(config.get("add_bos_token"))}
        if overrides is not None:
            entry["overrides"] = overrides
        entries[name] = (entry, cases)
        print(f"{name}: vocab {size}, {len(cases)} cases")

    for name, (tokenizer_json, config) in folders.items():
        folder = write_folder(name, tokenizer_json, config)
        # Read back from the file: exactly what the C++ side reads.
        add_entry(name, folder, Tokenizer.from_file(str(folder / "tokenizer.json")), config, None)
    for name, (base, overrides) in VARIANTS.items():
        tokenizer_json, config = folders[base]
        tok = Tokenizer.from_str(json.dumps({**tokenizer_json, **overrides}))
        add_entry(name, OUT_DIR / base, tok, config, overrides)
    write_cases(entries)


def write_cases(entries: dict) -> None:
    """One case per line, so that the file stays small and diffs stay readable."""
    def dump(value) -> str:
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))

    lines = ["{", f' "generator": {dump(f"tests/reference/make_hf_tokenizer_fixture.py, tokenizers {tokenizers.__version__}")},',
             ' "tokenizers": {']
    for i, (name, (entry, cases)) in enumerate(entries.items()):
        lines.append(f"  {dump(name)}: {dump(entry)[:-1]}, \"cases\": [")
        lines += [f"   {dump(case)}{',' if j + 1 < len(cases) else ''}" for j, case in enumerate(cases)]
        lines.append("  ]}" + ("," if i + 1 < len(entries) else ""))
    lines += [" }", "}"]
    text = "\n".join(lines) + "\n"
    json.loads(text)  # well-formed
    CASES_FILE.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
