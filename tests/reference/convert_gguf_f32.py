#!/usr/bin/env python3
"""Writes an unquantized copy (F32, or F16) of a GGUF model, metadata preserved.

Our engine dequantizes every tensor to f32 on load, while llama.cpp computes
with the quantized weights. An F32 copy lets llama.cpp run at the same
precision as our engine, for speed comparisons and as a tighter logits
reference. Only the tensor types and general.file_type change; every other
key/value pair, the tokenizer included, is copied as it is.

Usage:
  .venv-ref/bin/python tests/reference/convert_gguf_f32.py \
      [--in ~/.cache/inferlab/models/SmolLM2-135M-Instruct.Q4_1.gguf] \
      [--out ~/.cache/inferlab/models/SmolLM2-135M-Instruct.F32.gguf] [--type f32|f16]

Needs the `gguf` and `numpy` packages (scripts/setup-reference.sh installs them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

try:
    import gguf
    from gguf.quants import dequantize
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("convert_gguf_f32: the 'gguf' package is missing; run scripts/setup-reference.sh "
             "and use .venv-ref/bin/python")

MODEL_DIR = Path(os.environ.get("INFERLAB_MODEL_DIR",
                                Path.home() / ".cache" / "inferlab" / "models"))
DEFAULT_INPUT = MODEL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"

# The writer adds general.architecture itself; GGUF.* are the reader's virtual fields.
DERIVED_KEYS = {gguf.Keys.General.ARCHITECTURE}


def default_output(input_path: Path, out_type: str) -> Path:
    stem = input_path.name.removesuffix(".gguf")
    for quant in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "F32", "BF16",
                  "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S",
                  "Q5_K_M", "Q6_K"):
        if stem.endswith("." + quant):
            stem = stem[: -len(quant) - 1]
            break
    return input_path.with_name(f"{stem}.{out_type.upper()}.gguf")


def field_string(reader: gguf.GGUFReader, key: str) -> str:
    field = reader.get_field(key)
    if field is None:
        sys.exit(f"convert_gguf_f32: {key} missing from the input file")
    return field.contents()


def output_dtype(tensor: gguf.ReaderTensor, out_type: str) -> np.dtype:
    # As llama.cpp's own converters do: 1-D tensors (norms, biases) stay F32.
    if out_type == "f16" and len(tensor.shape) > 1:
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def convert(input_path: Path, output_path: Path, out_type: str) -> None:
    reader = gguf.GGUFReader(input_path)
    arch = field_string(reader, gguf.Keys.General.ARCHITECTURE)

    output_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output_path.name}.", suffix=".partial",
                                    dir=output_path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, arch)
        file_type = int(gguf.LlamaFileType.ALL_F32 if out_type == "f32"
                        else gguf.LlamaFileType.MOSTLY_F16)
        if reader.get_field(gguf.Keys.General.FILE_TYPE) is None:
            writer.add_file_type(file_type)
        for field in reader.fields.values():
            if field.name in DERIVED_KEYS or field.name.startswith("GGUF."):
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            value = file_type if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
            writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
            if field.name == gguf.Keys.General.ALIGNMENT:
                writer.data_alignment = field.contents()

        # Tensor infos first, then the data one tensor at a time, so that only
        # one dequantized tensor is in memory at once.
        for tensor in reader.tensors:
            dtype = output_dtype(tensor, out_type)
            shape = tuple(reversed([int(d) for d in tensor.shape]))  # numpy order (rows, cols)
            writer.add_tensor_info(tensor.name, shape, dtype,
                                   int(np.prod(shape)) * dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            values = dequantize(tensor.data, tensor.tensor_type)
            shape = tuple(reversed([int(d) for d in tensor.shape]))
            values = np.ascontiguousarray(values.reshape(shape).astype(output_dtype(tensor, out_type)))
            writer.write_tensor_data(values)
        writer.close()
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, output_path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def check(input_path: Path, output_path: Path) -> None:
    """Re-reads the output: same keys, same tensors, values equal to the dequantized input."""
    src = gguf.GGUFReader(input_path)
    dst = gguf.GGUFReader(output_path)
    src_keys = {k for k in src.fields if not k.startswith("GGUF.")} | {gguf.Keys.General.FILE_TYPE}
    dst_keys = {k for k in dst.fields if not k.startswith("GGUF.")}
    if src_keys != dst_keys:
        sys.exit(f"convert_gguf_f32: key sets differ: {sorted(src_keys ^ dst_keys)}")
    for key in src_keys - {gguf.Keys.General.FILE_TYPE}:
        if src.fields[key].contents() != dst.fields[key].contents():
            sys.exit(f"convert_gguf_f32: value of {key} differs after conversion")
    if [t.name for t in src.tensors] != [t.name for t in dst.tensors]:
        sys.exit("convert_gguf_f32: tensor lists differ after conversion")
    for a, b in zip(src.tensors, dst.tensors):
        if list(a.shape) != list(b.shape):
            sys.exit(f"convert_gguf_f32: shape of {a.name} differs: {list(a.shape)} vs {list(b.shape)}")
        ref = dequantize(a.data, a.tensor_type).reshape(-1)
        got = dequantize(b.data, b.tensor_type).reshape(-1)
        tol = 0.0 if b.tensor_type == gguf.GGMLQuantizationType.F32 else 1e-3 * float(np.abs(ref).max() + 1e-12)
        if float(np.abs(ref - got).max()) > tol:
            sys.exit(f"convert_gguf_f32: values of {a.name} differ after conversion")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in", dest="input", type=Path, default=DEFAULT_INPUT,
                        help=f"input GGUF (default {DEFAULT_INPUT})")
    parser.add_argument("--out", type=Path, default=None,
                        help="output GGUF (default: input name with .F32 / .F16)")
    parser.add_argument("--type", choices=("f32", "f16"), default="f32")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--no-check", action="store_true", help="skip re-reading the output")
    args = parser.parse_args()

    input_path = args.input.expanduser()
    output_path = (args.out or default_output(input_path, args.type)).expanduser()
    if not input_path.is_file():
        sys.exit(f"convert_gguf_f32: {input_path} not found (run scripts/fetch-model.sh)")
    if output_path.exists() and not args.force:
        print(f"convert_gguf_f32: {output_path} exists (use --force to rewrite)")
        return 0

    convert(input_path, output_path, args.type)
    if not args.no_check:
        check(input_path, output_path)
    print(f"convert_gguf_f32: wrote {output_path} ({output_path.stat().st_size / 1e6:.1f} MB, "
          f"{args.type.upper()}, metadata preserved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
