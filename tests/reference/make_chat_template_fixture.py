#!/usr/bin/env python3
"""Writes chat_template_cases.json: chat prompts as transformers renders them.

- smollm2: SmolLM2-135M-Instruct's own template (tokenizer.chat_template of the GGUF file, a
  ChatML template with a default system message), rendered by transformers'
  apply_chat_template, with the token ids of the rendered text.
- llama3: a template in Llama-3's format written here (bos_token, header ids, eot_id, trimmed
  content), rendered by jinja2 as transformers would.

The C++ test (tests/unit/test_chat_template.cpp) renders the same conversations natively.

Usage: .venv-lora/bin/python tests/reference/make_chat_template_fixture.py
Developer-time only: ctest reads the committed file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jinja2
from gguf import GGUFReader
from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent
MODEL = Path(os.environ.get("INFERLAB_MODEL_DIR", Path.home() / ".cache" / "inferlab" / "models")) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Name a colour of the sky."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "  Count to three.  "}],
]

LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                "'<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def main() -> None:
    reader = GGUFReader(str(MODEL))
    field = reader.fields["tokenizer.chat_template"]
    smol_template = bytes(field.parts[field.data[0]]).decode()
    tok = AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)
    smol = []
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            smol.append({"messages": messages, "add_generation_prompt": gen, "text": text, "tokens": ids})
    env = jinja2.Environment()
    llama = []
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = env.from_string(LLAMA3_STYLE).render(messages=messages, add_generation_prompt=gen,
                                                        bos_token="<|begin_of_text|>")
            llama.append({"messages": messages, "add_generation_prompt": gen, "text": text})
    doc = {"smollm2": {"template": smol_template, "cases": smol},
           "llama3": {"template": LLAMA3_STYLE, "cases": llama}}
    (HERE / "chat_template_cases.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
