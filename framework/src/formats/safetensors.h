// safetensors files (huggingface/safetensors): an 8-byte little-endian header
// length N, N bytes of JSON naming each tensor's dtype, shape and
// data_offsets [begin, end) into the byte buffer that follows (plus an
// optional "__metadata__" of strings). What PEFT writes its adapters as.
// Everything is checked before a tensor is read: the header's length and
// JSON, each entry's fields, a dtype this reader converts (F32, F16, BF16;
// others are refused naming theirs), that the shape's size matches the byte
// range, and that ranges stay inside the buffer without overlapping. Errors
// name the file and the tensor.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "inferlab/result.h"

namespace inferlab::safetensors {

enum class DType { F32, F16, BF16 };
const char* dtype_name(DType dtype);
int64_t dtype_bytes(DType dtype);

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // into the data buffer (after the header)
  int64_t n_elems() const;
};

class File {
 public:
  // The whole file, read and checked.
  static Result<File> open(const std::filesystem::path& path);
  // The same from bytes in memory; `origin` names them in errors.
  static Result<File> from_bytes(std::vector<uint8_t> bytes, std::string origin);

  const std::string& origin() const { return origin_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in header order
  const TensorInfo* find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // A tensor's values as float32 (F16 and BF16 widened exactly).
  std::vector<float> read_f32(const TensorInfo& tensor) const;

 private:
  std::string origin_;
  std::vector<uint8_t> bytes_;
  uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// One float32 tensor to write: row-major values of `shape`.
struct F32Tensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

// Writes `tensors` as F32 (in the order given, the header padded with spaces
// to 8 bytes as the reference writer does) with `metadata` as "__metadata__".
// A shape whose size differs from the values' is refused naming the tensor.
Status write_f32(const std::filesystem::path& path, const std::vector<F32Tensor>& tensors,
                 const std::map<std::string, std::string>& metadata = {});

}  // namespace inferlab::safetensors
