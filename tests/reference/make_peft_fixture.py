#!/usr/bin/env python3
"""Writes the PEFT LoRA golden fixtures: two adapters for SmolLM2-135M and the logits they give.

Transformers + PEFT part (fp32 throughout):
  peft_smollm2_a/, peft_smollm2_b/   adapter_config.json + adapter_model.safetensors (float16),
                                     written by PEFT's save_pretrained
  peft_smollm2_logits.json           top-8 logits and log-sum-exp at every position of two
                                     prompts: base, a, b and a+b (both adapters active)
llama.cpp part:
  peft_smollm2_a.gguf                adapter a converted by llama.cpp's convert_lora_to_gguf.py
                                     (--outtype f32)
  llamacpp_lora_logits.json          llama.cpp on the F32 copy of the model (f32 KV cache):
                                     base and with peft_smollm2_a.gguf as its LoRA

The base model is the GGUF file itself, loaded by transformers (which dequantizes it to
float32 and undoes the GGUF converter's q/k row permutation). Every reference logit is
computed after reloading the saved adapters, so the references use exactly the stored
float16 values (upcast to float32).

Usage:
  .venv-lora/bin/python tests/reference/make_peft_fixture.py [--model GGUF] [--skip-llamacpp]
      [--llama-cpp-dir DIR] [--cache-dir DIR]

Needs the venv of scripts/setup-reference-lora.sh. llama.cpp's conversion script comes
from the llama-cpp-python source distribution of the installed version (downloaded once
with pip into --cache-dir), unless --llama-cpp-dir names a llama.cpp source tree.
Developer-time only: ctest reads the committed files and needs no Python.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loading progress bar
# peft imports bitsandbytes, which logs about optional CPU kernels it cannot fetch.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

try:
    import torch
    import transformers
    import peft
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.numpy import load_file as load_safetensors
    from transformers import AutoModelForCausalLM, AutoTokenizer
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"make_peft_fixture: {exc.name} missing; run scripts/setup-reference-lora.sh "
             "and use .venv-lora/bin/python")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MODEL_DIR = Path(os.environ.get("INFERLAB_MODEL_DIR",
                                Path.home() / ".cache" / "inferlab" / "models"))
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "inferlab" / "lora-reference"

SENTENCES = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old barn.",
    "In the early morning light, the young scientists gathered their heavy instruments, checked "
    "the weather report once more, and set out across the frozen lake toward the small research "
    "station on the far northern shore.",
)
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Adapter a: plain LoRA, every projection of three layers.
CONFIG_A = dict(r=4, lora_alpha=8, target_modules=ALL_PROJ, layers_to_transform=[0, 14, 29],
                init_lora_weights=False, lora_dropout=0.0, bias="none")
# Adapter b: rsLoRA (scale alpha/sqrt(r)), q and v of layer 5 chosen by a regex. PEFT refuses
# layers_to_transform together with a regex target (and would ignore it in matching), so the
# layer is part of the regex.
CONFIG_B = dict(r=8, lora_alpha=16, use_rslora=True,
                target_modules=r".*\.layers\.5\.self_attn\.(q_proj|v_proj)",
                init_lora_weights=False, lora_dropout=0.0, bias="none")
# With init_lora_weights=False PEFT leaves nn.Linear's default init on A and B
# (uniform +-1/sqrt(fan_in)); lora_B is multiplied by these factors so the adapted logits
# move by a few units (clearly above float rounding) while the model stays sane.
B_SCALE = {"a": 0.25, "b": 0.25}
SEED = {"a": 20240501, "b": 20240502}
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOP = 8

log = logging.getLogger("make_peft_fixture")


# ---------------------------------------------------------------------------
# Models and logits

def load_base(model: Path) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(str(model.parent), gguf_file=model.name,
                                                dtype=torch.float32)
    base.eval()
    if not base.config.tie_word_embeddings:
        sys.exit("make_peft_fixture: expected tied embeddings")
    return base


@torch.no_grad()
def logits_of(model: torch.nn.Module, prompts: list[list[int]]) -> list[np.ndarray]:
    out = []
    for ids in prompts:
        result = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
        out.append(result.logits[0].float().numpy().copy())
    return out


def summarize(logits: list[np.ndarray]) -> list[list[dict]]:
    """R: per prompt, per position, the top-8 [id, logit] (descending) and the log-sum-exp."""
    runs = []
    for rows in logits:
        positions = []
        for row in rows:
            order = np.lexsort((np.arange(row.size), -row.astype(np.float64)))[:TOP]
            x = row.astype(np.float64)
            m = x.max()
            lse = m + math.log(float(np.exp(x - m).sum()))
            positions.append({"top": [[int(i), float(row[i])] for i in order], "lse": lse})
        runs.append(positions)
    return runs


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(max(np.abs(x.astype(np.float64) - y).max() for x, y in zip(a, b)))


# ---------------------------------------------------------------------------
# Adapters

def build_adapter(base: torch.nn.Module, name: str, folder: Path) -> None:
    """Creates adapter `name` with random A and B, stores it as float16 with save_pretrained."""
    torch.manual_seed(SEED[name])
    cfg = LoraConfig(**(CONFIG_A if name == "a" else CONFIG_B))
    model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".lora_B." in pname:
                p.mul_(B_SCALE[name])
            if ".lora_A." in pname or ".lora_B." in pname:
                p.data = p.data.to(torch.float16)
    stored = model.peft_config["default"]
    stored.base_model_name_or_path = BASE_ID
    if not isinstance(stored.target_modules, str):
        # PEFT keeps a set, written in hash order: a sorted list makes reruns byte-identical.
        stored.target_modules = sorted(stored.target_modules)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # the default adapter goes to the folder itself
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(Path(tmp) / f, folder / f)
    tensors = load_safetensors(str(folder / "adapter_model.safetensors"))
    dtypes = {str(t.dtype) for t in tensors.values()}
    log.info("adapter %s: %d tensors %s, %s", name, len(tensors), sorted(dtypes),
             f"{(folder / 'adapter_model.safetensors').stat().st_size / 1e3:.0f} kB")


def adapter_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """module name -> scale * B @ A in float32, from the stored file and config."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_safetensors(str(folder / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        deltas[module] = scale * (torch.from_numpy(b.astype(np.float32)) @ torch.from_numpy(a.astype(np.float32)))
    return deltas


def merged_by_hand(base: torch.nn.Module, folders: list[Path]) -> torch.nn.Module:
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for folder in folders:
            for module, delta in adapter_deltas(folder).items():
                modules[module].weight += delta
    return model


def check_reloaded(model: PeftModel, folder: Path, name: str) -> None:
    """The reloaded adapter holds the stored float16 values, as float32 parameters."""
    tensors = load_safetensors(str(folder / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        pname = key.replace(".lora_A.weight", f".lora_A.{name}.weight").replace(
            ".lora_B.weight", f".lora_B.{name}.weight")
        p = params[pname]
        if p.dtype != torch.float32:
            sys.exit(f"make_peft_fixture: {pname} reloaded as {p.dtype}, expected float32")
        if not np.array_equal(p.detach().numpy(), value.astype(np.float32)):
            sys.exit(f"make_peft_fixture: {pname} differs from the stored float16 values")


# ---------------------------------------------------------------------------
# llama.cpp

def llama_cpp_source(args, version: str) -> Path:
    if args.llama_cpp_dir:
        src = args.llama_cpp_dir.expanduser()
    else:
        root = args.cache_dir / f"llama_cpp_python-{version}"
        src = root / "vendor" / "llama.cpp"
        if not (src / "convert_lora_to_gguf.py").is_file():
            args.cache_dir.mkdir(parents=True, exist_ok=True)
            log.info("downloading the llama-cpp-python %s source distribution (llama.cpp's "
                     "conversion scripts)", version)
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
                            "--no-deps", f"llama-cpp-python=={version}", "-d", str(args.cache_dir)],
                           check=True)
            sdist = args.cache_dir / f"llama_cpp_python-{version}.tar.gz"
            with tarfile.open(sdist) as tar:
                tar.extractall(args.cache_dir, filter="data")
    if not (src / "convert_lora_to_gguf.py").is_file():
        sys.exit(f"make_peft_fixture: no convert_lora_to_gguf.py in {src}")
    return src


def convert_adapter(args, base: torch.nn.Module, folder: Path, out: Path, llama_src: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # The converter needs only the base model's Hugging Face config (architecture and
        # shapes, for the q/k permutation); the weights are not read.
        config = copy.deepcopy(base.config)
        config.architectures = [type(base).__name__]  # as save_pretrained of the model writes
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # "gguf" describes how it was loaded, not the weights
        config.save_pretrained(tmp)
        cmd = [sys.executable, str(llama_src / "convert_lora_to_gguf.py"), "--base", tmp,
               "--outtype", "f32", "--outfile", str(out), str(folder)]
        env = dict(os.environ)
        env.pop("NO_LOCAL_GGUF", None)  # use llama.cpp's own gguf-py, as its script expects
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            sys.exit("make_peft_fixture: convert_lora_to_gguf.py failed")


def f32_model(args, model: Path) -> Path:
    out = args.cache_dir / model.name.replace(".Q4_1.gguf", ".F32.gguf")
    if not out.is_file():
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(HERE / "convert_gguf_f32.py"), "--in", str(model),
                        "--out", str(out)], check=True)
    return out


def llama_cpp_logits(model: Path, prompts: list[list[int]], lora: Path | None) -> list[np.ndarray]:
    import llama_cpp
    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(str(model), logits_all=True, n_ctx=256, n_batch=256, n_threads=2,
                          n_threads_batch=2, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, seed=0, verbose=False, **kwargs)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    del llm
    return out


def describe_gguf(path: Path) -> None:
    import gguf
    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        value = field.contents()
        print(f"    {field.name} = {value!r}")
    names = [t.name for t in reader.tensors]
    print(f"    {len(names)} tensors; layer 0:")
    for t in reader.tensors:
        if t.name.startswith("blk.0."):
            print(f"      {t.name:34s} ggml ne={list(map(int, t.shape))} {t.tensor_type.name}")


# ---------------------------------------------------------------------------

def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR / MODEL_NAME)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"F32 model copy and llama.cpp source (default {DEFAULT_CACHE})")
    parser.add_argument("--llama-cpp-dir", type=Path, default=None,
                        help="a llama.cpp source tree with convert_lora_to_gguf.py")
    parser.add_argument("--skip-llamacpp", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="make_peft_fixture: %(message)s")
    for noisy in ("transformers", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # one thread: reproducible sums, and the other core stays free

    model_path = args.model.expanduser()
    if not model_path.is_file():
        sys.exit(f"make_peft_fixture: {model_path} not found (run scripts/fetch-model.sh)")
    args.cache_dir = args.cache_dir.expanduser()
    out_dir = args.out_dir
    folders = {"a": out_dir / "peft_smollm2_a", "b": out_dir / "peft_smollm2_b"}

    log.info("loading %s with transformers %s", model_path.name, transformers.__version__)
    base = load_base(model_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    prompts = [list(map(int, tokenizer(s, add_special_tokens=False)["input_ids"])) for s in SENTENCES]
    log.info("prompts: %s tokens", [len(p) for p in prompts])

    for name in ("a", "b"):
        build_adapter(base, name, folders[name])

    # References, all from the reloaded float16 adapters.
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folders["a"]), adapter_name="a")
    model.load_adapter(str(folders["b"]), adapter_name="b")
    model.eval()
    check_reloaded(model, folders["a"], "a")
    check_reloaded(model, folders["b"], "b")

    logits = {"base": logits_of(base, prompts)}
    model.base_model.set_adapter("a")
    logits["a"] = logits_of(model, prompts)
    model.base_model.set_adapter("b")
    logits["b"] = logits_of(model, prompts)
    model.base_model.set_adapter(["a", "b"])
    if sorted(model.base_model.active_adapters) != ["a", "b"]:
        sys.exit("make_peft_fixture: could not activate both adapters")
    logits["a+b"] = logits_of(model, prompts)

    # Equivalent computations: W + scale * B @ A by hand, and PEFT's own merge.
    by_hand = {
        "a": logits_of(merged_by_hand(base, [folders["a"]]), prompts),
        "b": logits_of(merged_by_hand(base, [folders["b"]]), prompts),
        "a+b": logits_of(merged_by_hand(base, [folders["a"], folders["b"]]), prompts),
    }
    hand_diff = {k: max_diff(v, logits[k]) for k, v in by_hand.items()}
    model.base_model.set_adapter("a")
    model.merge_adapter(["a"])
    peft_merged_a = logits_of(model, prompts)
    model.unmerge_adapter()
    merge_diff = max_diff(peft_merged_a, logits["a"])
    noise = max(merge_diff, *hand_diff.values())
    if noise > 1e-3:
        sys.exit(f"make_peft_fixture: equivalent runs differ by {noise:.2e}; "
                 "multiple active adapters may not be summed as expected")

    vs_base = {k: max_diff(logits[k], logits["base"]) for k in ("a", "b", "a+b")}
    top1_same = {k: float(np.mean(np.concatenate([
        (x.argmax(1) == y.argmax(1)) for x, y in zip(logits[k], logits["base"])]))) for k in vs_base}
    doc = {
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__.split("+")[0],
        "model": MODEL_NAME,
        "prompts": prompts,
        "runs": {k: summarize(v) for k, v in logits.items()},
        "max_abs_diff_vs_base": vs_base,
        "tolerance_note": (
            f"fp32 noise: max |logit| difference between equivalent runs is {noise:.2e} "
            f"(PEFT merged vs unmerged a: {merge_diff:.2e}; W + scale*B@A merged by hand vs PEFT "
            f"unmerged: a {hand_diff['a']:.2e}, b {hand_diff['b']:.2e}, a+b {hand_diff['a+b']:.2e})"),
    }
    write_json(out_dir / "peft_smollm2_logits.json", doc)
    log.info("max |logit - base|: %s; top-1 same as base: %s",
             {k: round(v, 3) for k, v in vs_base.items()}, {k: round(v, 3) for k, v in top1_same.items()})
    log.info("%s", doc["tolerance_note"])

    if args.skip_llamacpp:
        return 0

    import llama_cpp
    llama_src = llama_cpp_source(args, llama_cpp.__version__)
    adapter_gguf = out_dir / "peft_smollm2_a.gguf"
    convert_adapter(args, base, folders["a"], adapter_gguf, llama_src)
    log.info("wrote %s (%.0f kB, f32), metadata:", adapter_gguf, adapter_gguf.stat().st_size / 1e3)
    describe_gguf(adapter_gguf)

    f32 = f32_model(args, model_path)
    lc = {"base": llama_cpp_logits(f32, prompts, None),
          "a": llama_cpp_logits(f32, prompts, adapter_gguf)}
    write_json(out_dir / "llamacpp_lora_logits.json", {
        "llama_cpp_python": llama_cpp.__version__,
        "adapter": adapter_gguf.name,
        "prompts": prompts,
        "runs": {k: summarize(v) for k, v in lc.items()},
    })
    log.info("llama.cpp vs transformers(+peft), max |logit diff| over all logits: base %.2e, a %.2e "
             "(a vs base in llama.cpp: %.3f)", max_diff(lc["base"], logits["base"]),
             max_diff(lc["a"], logits["a"]), max_diff(lc["a"], lc["base"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
