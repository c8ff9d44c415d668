#!/usr/bin/env python3
"""Writes the fine-tuning gradient fixture: PyTorch autograd's LoRA gradients on SmolLM2-135M.

The base model is the GGUF file itself, loaded by transformers (float32, the GGUF converter's
q/k row permutation undone); the adapter is the committed PEFT adapter peft_smollm2_a/ (every
projection of layers 0, 14 and 29, r=4, alpha=8), loaded trainable with PEFT. The batch is two
sequences of 40 tokens of fixed text; position t predicts token t+1, and the first 5 positions
of each sequence have no target (a prompt's). The loss is the summed cross-entropy over the
positions with a target; one backward pass gives d(loss)/d(lora_A) and d(loss)/d(lora_B) of
every module.

Writes:
  lora_grad_smollm2.json                tokens, targets, the summed loss, the token count
  lora_grad_smollm2.safetensors         float32 gradients named as PEFT names the parameters
                                        (base_model.model.model.layers.N.<module>.lora_A.weight ...)

Usage:
  .venv-lora/bin/python tests/reference/make_lora_grad_fixture.py [--model GGUF]

Needs the venv of scripts/setup-reference-lora.sh. Developer-time only: ctest reads the
committed files (tests/unit/test_lora_grad_reference.cpp) and needs no Python.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

try:
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"make_lora_grad_fixture: {exc.name} missing; run scripts/setup-reference-lora.sh "
             "and use .venv-lora/bin/python")

HERE = Path(__file__).resolve().parent
MODEL_DIR = Path(os.environ.get("INFERLAB_MODEL_DIR", Path.home() / ".cache" / "inferlab" / "models"))
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The river wound slowly through the valley, past the mill and the church, and the children "
        "who lived along its banks learned to swim before they could read. Every summer the water "
        "fell, the stones showed their backs, and the old men argued about the year of the great flood. "
        "In the autumn the mist lay on the meadows until noon, the geese passed over in long uneven lines, "
        "and the miller's daughter counted them from the bridge, writing each number in a small blue book.")
SEQUENCES, LENGTH, PROMPT = 2, 40, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL_DIR / MODEL_NAME)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.model.is_file():
        sys.exit(f"make_lora_grad_fixture: {args.model} not found (scripts/fetch-model.sh)")

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model.parent), gguf_file=args.model.name)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    if len(ids) < SEQUENCES * LENGTH + 1:
        sys.exit(f"make_lora_grad_fixture: the text gives {len(ids)} tokens, fewer than needed")
    tokens = [ids[s * LENGTH:(s + 1) * LENGTH] for s in range(SEQUENCES)]
    nexts = [ids[s * LENGTH + 1:(s + 1) * LENGTH + 1] for s in range(SEQUENCES)]
    targets = [[-1 if t < PROMPT or t == LENGTH - 1 else nxt[t] for t in range(LENGTH)] for nxt in nexts]

    base = AutoModelForCausalLM.from_pretrained(str(args.model.parent), gguf_file=args.model.name,
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(HERE / "peft_smollm2_a"), is_trainable=True)
    model.train()  # lora_dropout is 0: train mode changes nothing but PEFT's bookkeeping
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
        if ".lora_" in name and p.dtype != torch.float32:
            sys.exit(f"make_lora_grad_fixture: {name} is {p.dtype}, expected float32")

    logits = model(input_ids=torch.tensor(tokens, dtype=torch.long), use_cache=False).logits
    target = torch.tensor(targets, dtype=torch.long)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-1, reduction="sum")
    loss.backward()
    count = int((target >= 0).sum())

    grads = {}
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            continue
        # PEFT's parameter ...lora_A.default.weight is stored as ...lora_A.weight in adapter files.
        key = name.replace(".default.weight", ".weight")
        grads[key] = p.grad.detach().to(torch.float32).contiguous().clone()
    save_file(grads, str(HERE / "lora_grad_smollm2.safetensors"))
    fixture = {
        "model": MODEL_NAME,
        "adapter": "peft_smollm2_a",
        "tokens": tokens,
        "targets": targets,
        "loss_sum": float(loss.item()),
        "tokens_with_target": count,
        "torch": torch.__version__,
    }
    (HERE / "lora_grad_smollm2.json").write_text(json.dumps(fixture, indent=1) + "\n")
    logging.info("loss %.6f over %d tokens (mean %.4f); %d gradient tensors", loss.item(), count,
                 loss.item() / count, len(grads))


if __name__ == "__main__":
    main()
