#!/usr/bin/env python3
"""Writes tests/reference/smollm2_llamacpp_q4_1.json: llama.cpp computing with
the Q4_1 file itself (its quantized weights, f32 KV cache), for the prompts of
make_top1_fixture.py: at every position the top-8 token ids with their logits
and the log-sum-exp of the row. The unit test
EngineRealModel.FileWeightsMatchLlamaCppOnTheSameFile checks inferlab's
`weights = file` path (the same block arithmetic) against it.

Regenerate (after scripts/setup-reference.sh):
  .venv-ref/bin/python tests/reference/make_file_weights_fixture.py
"""
import hashlib
import llama_cpp
import numpy as np

from make_top1_fixture import Q4_1_MODEL, prompt_logits, write_fixture

TOP = 8


def main() -> None:
    q41 = Q4_1_MODEL
    cases = []
    for name, _, tokens, logits in prompt_logits(q41):
        rows = []
        for row in logits:
            top = np.argsort(row)[::-1][:TOP]
            m = row.max()
            lse = m + np.log(np.exp(row - m).sum())
            rows.append({"top": [[int(i), round(float(row[i]), 5)] for i in top], "lse": round(float(lse), 5)})
        cases.append({"name": name, "tokens": tokens, "rows": rows})
    fixture = {"model_sha256": hashlib.sha256(q41.read_bytes()).hexdigest(),
               "reference": f"llama-cpp-python {llama_cpp.__version__}, Q4_1 file, f32 KV cache, 2 threads",
               "cases": cases}
    write_fixture(fixture, "smollm2_llamacpp_q4_1.json")


if __name__ == "__main__":
    main()
