#!/usr/bin/env python3
"""Writes the fine-tuning round-trip fixture: an adapter trained by `inferlab finetune`, loaded by PEFT.

1. `inferlab finetune` trains a small LoRA adapter on SmolLM2-135M-Instruct (a King James Bible
   excerpt; q_proj, k_proj, o_proj and down_proj of layers 0 and 29, r=4, alpha=8, 15 steps) and
   writes it as a PEFT folder: finetuned_smollm2/ (adapter_config.json, adapter_model.safetensors).
2. transformers loads the GGUF model (float32, q/k rows un-permuted) and PEFT loads that folder
   with PeftModel.from_pretrained, as any PEFT user would; the logits of the two prompts of
   make_peft_fixture.py, with and without the adapter, go to finetuned_smollm2_logits.json
   (per position: top-8 [id, logit] and the log-sum-exp).

The C++ test (plugins/lora/tests/test_lora_reference.cpp) loads the same folder with the lora
plugin and compares. That q_proj and k_proj agree shows the writer undid GGUF's row permutation.

Usage:
  .venv-lora/bin/python tests/reference/make_finetune_peft_fixture.py --inferlab build/bin/inferlab

Needs the venv of scripts/setup-reference-lora.sh and the corpus of scripts/fetch-corpus.sh.
Developer-time only: ctest reads the committed files and needs no Python.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

try:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"make_finetune_peft_fixture: {exc.name} missing; run scripts/setup-reference-lora.sh "
             "and use .venv-lora/bin/python")

from make_peft_fixture import MODEL_DIR, MODEL_NAME, SENTENCES, load_base, logits_of, summarize

HERE = Path(__file__).resolve().parent
CORPUS = Path(os.environ.get("INFERLAB_CORPUS_DIR", Path.home() / ".cache" / "inferlab" / "corpora")) / "kjv.txt"
OUT = HERE / "finetuned_smollm2"
CONFIG = """[model]
name = "smollm2-135m"
[finetune]
data = "{data}"
targets = ["q_proj", "k_proj", "o_proj", "down_proj"]
layers = [0, 29]
r = 4
alpha = 8
steps = 15
batch = 2
seq_len = 64
lr = 0.005
seed = 3
log_every = 5
output = "{out}"
overwrite = true
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inferlab", type=Path, required=True, help="the inferlab executable")
    parser.add_argument("--model", type=Path, default=MODEL_DIR / MODEL_NAME)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not CORPUS.is_file():
        sys.exit(f"make_finetune_peft_fixture: {CORPUS} not found (scripts/fetch-corpus.sh)")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "kjv_excerpt.txt"
        data.write_bytes(CORPUS.read_bytes()[:20000])
        config = Path(tmp) / "finetune.toml"
        config.write_text(CONFIG.format(data=data, out=OUT))
        subprocess.run([str(args.inferlab), "finetune", str(config), "--no-db"], check=True)

    tokenizer = AutoTokenizer.from_pretrained(str(args.model.parent), gguf_file=args.model.name)
    prompts = [list(map(int, tokenizer(s, add_special_tokens=False)["input_ids"])) for s in SENTENCES]
    base = load_base(args.model)
    base_logits = logits_of(base, prompts)
    tuned = PeftModel.from_pretrained(base, str(OUT))
    tuned.eval()
    tuned_logits = logits_of(tuned, prompts)
    moved = max(float(abs(a - b).max()) for a, b in zip(base_logits, tuned_logits))
    logging.info("the adapter moves logits by up to %.3f", moved)
    doc = {"model": MODEL_NAME, "adapter": OUT.name, "prompts": prompts,
           "runs": {"base": summarize(base_logits), "finetuned": summarize(tuned_logits)},
           "torch": torch.__version__}
    (HERE / "finetuned_smollm2_logits.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
