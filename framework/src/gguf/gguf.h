// GGUF container: reader (memory-mapped, bounds-checked), writer, and the
// tensor type table. Spec: GGUF versions 2 and 3 (little-endian).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "inferlab/result.h"

namespace inferlab::gguf {

// Numeric ids are the GGUF/ggml ones; do not renumber.
enum class TensorType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};

enum class ValueType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6,
  BOOL = 7, STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};

// Properties of a tensor type; `supported` says whether we can dequantize it.
struct TypeTraits {
  std::string_view name;
  int64_t block_elems;   // elements per block (1 for plain floats)
  int64_t block_bytes;   // bytes per block
  bool supported;
};
// nullopt for an id we do not know at all.
std::optional<TypeTraits> type_traits(uint32_t type_id);
std::string_view type_name(TensorType type);
// Bytes taken by `n_elems` elements (n_elems must be a multiple of block_elems).
uint64_t type_bytes(TensorType type, int64_t n_elems);

// One metadata value. Arrays keep their element type. Scalars are stored as:
// unsigned integers uint64_t, signed integers int64_t, FLOAT32/FLOAT64 double,
// BOOL bool, STRING std::string.
struct Value {
  ValueType type = ValueType::UINT8;
  std::variant<uint64_t, int64_t, double, bool, std::string> scalar;  // non-array
  ValueType elem_type = ValueType::UINT8;                            // arrays only
  std::vector<Value> array;                                          // arrays only
};

struct TensorInfo {
  std::string name;
  TensorType type;
  std::vector<int64_t> dims;  // ggml order: dims[0] is the contiguous (fastest) one
  uint64_t offset = 0;        // relative to the data section
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;  // into the mapping; valid while the file lives
  int64_t n_elems() const;
};

class File {
 public:
  // Maps the file and validates header, metadata, tensor directory, alignment and
  // that every tensor lies inside the file. Errors name the file and the fault.
  static Result<std::shared_ptr<File>> open(const std::filesystem::path& path);
  // The same checks on bytes in memory (fuzzing, tests); `name` stands for the
  // path in messages.
  static Result<std::shared_ptr<File>> from_bytes(std::vector<uint8_t> bytes, const std::string& name);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::filesystem::path& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t file_size() const { return size_; }
  const uint8_t* bytes() const { return base_; }

  const std::map<std::string, Value>& metadata() const { return metadata_; }
  const Value* find(std::string_view key) const;
  // Typed getters accept any integer/float type that converts without loss of meaning.
  std::optional<int64_t> get_int(std::string_view key) const;
  std::optional<double> get_float(std::string_view key) const;
  std::optional<bool> get_bool(std::string_view key) const;
  std::optional<std::string> get_string(std::string_view key) const;
  std::optional<std::vector<std::string>> get_string_array(std::string_view key) const;
  std::optional<std::vector<int64_t>> get_int_array(std::string_view key) const;
  std::optional<std::vector<double>> get_float_array(std::string_view key) const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(std::string_view name) const;

 private:
  File() = default;
  static Result<std::shared_ptr<File>> parse_into(std::shared_ptr<File> file, const std::string& shown);
  std::filesystem::path path_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t size_ = 0;
  const uint8_t* base_ = nullptr;
  bool mapped_ = false;          // base_ is a mapping (else it points into owned_)
  std::vector<uint8_t> owned_;
  std::map<std::string, Value> metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

// Dequantizes `n_elems` elements of `type` from `src` into `dst`.
// Error for unsupported types or n_elems not a multiple of the block size.
Status dequantize(TensorType type, const void* src, float* dst, int64_t n_elems);
// Convenience: the whole tensor into a new vector.
Result<std::vector<float>> dequantize(const TensorInfo& tensor);
// Quantizes float data into `type` (F32, F16, BF16, Q8_0, Q4_0, Q4_1); used by the
// writer for test models. Returns the encoded bytes.
Result<std::vector<uint8_t>> quantize(TensorType type, const float* src, int64_t n_elems);

// Builds a GGUF file in memory and writes it (version 3, alignment 32 by default).
class Writer {
 public:
  void set_u32(const std::string& key, uint32_t v);
  void set_i32(const std::string& key, int32_t v);
  void set_u64(const std::string& key, uint64_t v);
  void set_f32(const std::string& key, float v);
  void set_bool(const std::string& key, bool v);
  void set_string(const std::string& key, const std::string& v);
  void set_string_array(const std::string& key, const std::vector<std::string>& v);
  void set_i32_array(const std::string& key, const std::vector<int32_t>& v);
  void set_f32_array(const std::string& key, const std::vector<float>& v);
  void set_alignment(uint32_t alignment);  // also written as general.alignment
  // Raw, already-encoded tensor bytes.
  Status add_tensor(const std::string& name, TensorType type, std::vector<int64_t> dims,
                    std::vector<uint8_t> bytes);
  // Float data encoded to `type`.
  Status add_tensor_f32(const std::string& name, TensorType type, std::vector<int64_t> dims,
                        const std::vector<float>& data);
  Status write(const std::filesystem::path& path) const;

 private:
  struct PendingTensor {
    std::string name;
    TensorType type;
    std::vector<int64_t> dims;
    std::vector<uint8_t> bytes;
  };
  std::vector<std::pair<std::string, Value>> metadata_;  // insertion order
  std::vector<PendingTensor> tensors_;
  uint32_t alignment_ = 32;
};

}  // namespace inferlab::gguf
