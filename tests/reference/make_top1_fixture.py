#!/usr/bin/env python3
"""Writes tests/reference/smollm2_llamacpp_top1.json: token ids of a few prompts
and llama.cpp's top-1 prediction and top-1/top-2 logit margin at every position
(llama.cpp on the F32 copy of SmolLM2-135M-Instruct, f32 KV cache). The unit
test EngineRealModel.Top1MatchesLlamaCpp checks inferlab against it.

Regenerate (after scripts/setup-reference.sh and convert_gguf_f32.py):
  .venv-ref/bin/python tests/reference/make_top1_fixture.py
"""
import hashlib
import json
import os
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama

PROMPTS = {
    "capital": "The capital of France is Paris. The capital of Germany is",
    "chat": "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
    "numbers": "In 1969, 3 astronauts flew 384,400 km to the Moon; 2 of them walked on it for 21.5 hours.",
}


MODELS = Path(os.environ.get("INFERLAB_MODEL_DIR", Path.home() / ".cache/inferlab/models"))
Q4_1_MODEL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompt_logits(model: Path):
    """(name, text, token ids, logits of every position) of each prompt, from llama.cpp
    on `model` with an f32 KV cache and 2 threads."""
    llm = Llama(str(model), logits_all=True, n_ctx=512, n_threads=2, type_k=llama_cpp.GGML_TYPE_F32,
                type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    for name, text in PROMPTS.items():
        tokens = [int(t) for t in llm.tokenize(text.encode(), add_bos=False, special=True)]
        llm.reset()
        llm.eval(tokens)
        yield name, text, tokens, np.array(llm.scores[: len(tokens)], dtype=np.float64)


def main() -> None:
    q41 = Q4_1_MODEL
    cases = []
    for name, text, tokens, logits in prompt_logits(MODELS / "SmolLM2-135M-Instruct.F32.gguf"):
        top2 = np.sort(logits, axis=1)[:, -2:]
        cases.append({"name": name, "text": text, "tokens": tokens,
                      "top1": [int(i) for i in logits.argmax(axis=1)],
                      "margin": [round(float(m), 4) for m in (top2[:, 1] - top2[:, 0])]})
    fixture = {"model_sha256": hashlib.sha256(q41.read_bytes()).hexdigest(),
               "reference": f"llama-cpp-python {llama_cpp.__version__}, F32 copy, f32 KV cache",
               "cases": cases}
    write_fixture(fixture, "smollm2_llamacpp_top1.json")


def write_fixture(fixture: dict, name: str) -> None:
    """Writes a fixture next to this script and says how many positions it holds."""
    out = Path(__file__).parent / name
    out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {out}: {sum(len(c['tokens']) for c in fixture['cases'])} positions")


if __name__ == "__main__":
    main()
