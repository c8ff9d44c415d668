// GGUF writer (version 3): header, metadata, tensor directory, then each tensor's
// data at an offset aligned to the file's alignment.
#include <fmt/format.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "gguf/gguf.h"

namespace inferlab::gguf {

namespace {

constexpr uint32_t kVersion = 3;

Value scalar_value(ValueType type, std::variant<uint64_t, int64_t, double, bool, std::string> v) {
  Value out;
  out.type = type;
  out.scalar = std::move(v);
  return out;
}

template <typename T, typename Convert>
Value array_value(ValueType elem_type, const std::vector<T>& items, Convert convert) {
  Value out;
  out.type = ValueType::ARRAY;
  out.elem_type = elem_type;
  out.array.reserve(items.size());
  for (const T& item : items) out.array.push_back(scalar_value(elem_type, convert(item)));
  return out;
}

class ByteSink {
 public:
  template <typename T>
  void put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    bytes_.insert(bytes_.end(), p, p + sizeof v);
  }
  void put_string(const std::string& s) {
    put<uint64_t>(s.size());
    bytes_.insert(bytes_.end(), s.begin(), s.end());
  }
  void put_value(const Value& v);
  void pad_to(uint64_t alignment) {
    while (bytes_.size() % alignment != 0) bytes_.push_back(0);
  }
  const std::vector<uint8_t>& bytes() const { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

void ByteSink::put_value(const Value& v) {
  switch (v.type) {
    case ValueType::UINT8:
      put(static_cast<uint8_t>(std::get<uint64_t>(v.scalar)));
      break;
    case ValueType::UINT16:
      put(static_cast<uint16_t>(std::get<uint64_t>(v.scalar)));
      break;
    case ValueType::UINT32:
      put(static_cast<uint32_t>(std::get<uint64_t>(v.scalar)));
      break;
    case ValueType::UINT64:
      put(std::get<uint64_t>(v.scalar));
      break;
    case ValueType::INT8:
      put(static_cast<int8_t>(std::get<int64_t>(v.scalar)));
      break;
    case ValueType::INT16:
      put(static_cast<int16_t>(std::get<int64_t>(v.scalar)));
      break;
    case ValueType::INT32:
      put(static_cast<int32_t>(std::get<int64_t>(v.scalar)));
      break;
    case ValueType::INT64:
      put(std::get<int64_t>(v.scalar));
      break;
    case ValueType::FLOAT32:
      put(static_cast<float>(std::get<double>(v.scalar)));
      break;
    case ValueType::FLOAT64:
      put(std::get<double>(v.scalar));
      break;
    case ValueType::BOOL:
      put(static_cast<uint8_t>(std::get<bool>(v.scalar) ? 1 : 0));
      break;
    case ValueType::STRING:
      put_string(std::get<std::string>(v.scalar));
      break;
    case ValueType::ARRAY:
      put(static_cast<uint32_t>(v.elem_type));
      put<uint64_t>(v.array.size());
      for (const Value& e : v.array) put_value(e);
      break;
  }
}

void set_value(std::vector<std::pair<std::string, Value>>& metadata, const std::string& key,
               Value value) {
  for (auto& [k, v] : metadata) {
    if (k == key) {  // a second set replaces the value and keeps the position
      v = std::move(value);
      return;
    }
  }
  metadata.emplace_back(key, std::move(value));
}

}  // namespace

void Writer::set_u32(const std::string& key, uint32_t v) {
  set_value(metadata_, key, scalar_value(ValueType::UINT32, uint64_t{v}));
}
void Writer::set_i32(const std::string& key, int32_t v) {
  set_value(metadata_, key, scalar_value(ValueType::INT32, int64_t{v}));
}
void Writer::set_u64(const std::string& key, uint64_t v) {
  set_value(metadata_, key, scalar_value(ValueType::UINT64, v));
}
void Writer::set_f32(const std::string& key, float v) {
  set_value(metadata_, key, scalar_value(ValueType::FLOAT32, double{v}));
}
void Writer::set_bool(const std::string& key, bool v) {
  set_value(metadata_, key, scalar_value(ValueType::BOOL, v));
}
void Writer::set_string(const std::string& key, const std::string& v) {
  set_value(metadata_, key, scalar_value(ValueType::STRING, v));
}
void Writer::set_string_array(const std::string& key, const std::vector<std::string>& v) {
  set_value(metadata_, key,
            array_value(ValueType::STRING, v, [](const std::string& s) { return s; }));
}
void Writer::set_i32_array(const std::string& key, const std::vector<int32_t>& v) {
  set_value(metadata_, key, array_value(ValueType::INT32, v, [](int32_t x) { return int64_t{x}; }));
}
void Writer::set_f32_array(const std::string& key, const std::vector<float>& v) {
  set_value(metadata_, key, array_value(ValueType::FLOAT32, v, [](float x) { return double{x}; }));
}
void Writer::set_alignment(uint32_t alignment) {
  alignment_ = alignment;  // validated by write()
  set_u32("general.alignment", alignment);
}

Status Writer::add_tensor(const std::string& name, TensorType type, std::vector<int64_t> dims,
                          std::vector<uint8_t> bytes) {
  const auto traits = type_traits(static_cast<uint32_t>(type));
  if (!traits) {
    return Error{fmt::format("tensor '{}': unknown type id {}", name, static_cast<uint32_t>(type))};
  }
  if (dims.empty() || dims.size() > 4) {
    return Error{fmt::format("tensor '{}' has {} dimensions; must be 1 to 4", name, dims.size())};
  }
  int64_t n_elems = 1;
  for (size_t i = 0; i < dims.size(); ++i) {
    if (dims[i] <= 0) {
      return Error{
          fmt::format("tensor '{}' has dimension {} = {}; must be positive", name, i, dims[i])};
    }
    if (__builtin_mul_overflow(n_elems, dims[i], &n_elems)) {
      return Error{fmt::format("tensor '{}' has too many elements", name)};
    }
  }
  if (dims[0] % traits->block_elems != 0) {
    return Error{fmt::format("tensor '{}' has dims[0] = {}, not a multiple of the {} block size {}",
                             name, dims[0], traits->name, traits->block_elems)};
  }
  const uint64_t expected = type_bytes(type, n_elems);
  if (bytes.size() != expected) {
    return Error{fmt::format("tensor '{}': {} bytes given, but {} elements of {} take {} bytes",
                             name, bytes.size(), n_elems, traits->name, expected)};
  }
  for (const PendingTensor& t : tensors_) {
    if (t.name == name) return Error{fmt::format("duplicate tensor name '{}'", name)};
  }
  tensors_.push_back(PendingTensor{name, type, std::move(dims), std::move(bytes)});
  return ok_status();
}

Status Writer::add_tensor_f32(const std::string& name, TensorType type, std::vector<int64_t> dims,
                              const std::vector<float>& data) {
  int64_t n_elems = 1;
  for (int64_t d : dims) {
    if (d <= 0 || __builtin_mul_overflow(n_elems, d, &n_elems)) {
      return Error{fmt::format("tensor '{}' has invalid dimension {}", name, d)};
    }
  }
  if (static_cast<uint64_t>(n_elems) != data.size()) {
    return Error{fmt::format("tensor '{}': {} floats given for dimensions holding {}", name,
                             data.size(), n_elems)};
  }
  auto bytes = quantize(type, data.data(), n_elems);
  if (!bytes) return Error{fmt::format("tensor '{}': {}", name, bytes.message())};
  return add_tensor(name, type, std::move(dims), std::move(*bytes));
}

Status Writer::write(const std::filesystem::path& path) const {
  const std::string shown = path.string();
  // general.alignment set directly (not via set_alignment) must still be honored,
  // or the reader would look for the data in the wrong place.
  uint64_t alignment = alignment_;
  for (const auto& [key, value] : metadata_) {
    if (key != "general.alignment") continue;
    if (value.type != ValueType::UINT32) {
      return Error{fmt::format("{}: general.alignment must be a UINT32 value", shown)};
    }
    alignment = std::get<uint64_t>(value.scalar);
  }
  if (alignment == 0 || !std::has_single_bit(alignment)) {
    return Error{
        fmt::format("{}: alignment must be a nonzero power of two, got {}", shown, alignment)};
  }
  ByteSink head;
  head.put<uint32_t>(0x46554747);  // "GGUF" read as a little-endian uint32
  head.put<uint32_t>(kVersion);
  head.put<uint64_t>(tensors_.size());
  head.put<uint64_t>(metadata_.size());
  for (const auto& [key, value] : metadata_) {
    head.put_string(key);
    head.put(static_cast<uint32_t>(value.type));
    head.put_value(value);
  }
  uint64_t offset = 0;  // relative to the data section
  for (const PendingTensor& t : tensors_) {
    head.put_string(t.name);
    head.put<uint32_t>(static_cast<uint32_t>(t.dims.size()));
    for (int64_t d : t.dims) head.put<uint64_t>(static_cast<uint64_t>(d));
    head.put(static_cast<uint32_t>(t.type));
    head.put<uint64_t>(offset);
    offset += t.bytes.size();
    offset += (alignment - offset % alignment) % alignment;
  }
  head.pad_to(alignment);

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Error{fmt::format("{}: cannot create: {}", shown, std::strerror(errno))};
  out.write(reinterpret_cast<const char*>(head.bytes().data()),
            static_cast<std::streamsize>(head.bytes().size()));
  const std::vector<char> zeros(alignment, 0);
  for (const PendingTensor& t : tensors_) {
    out.write(reinterpret_cast<const char*>(t.bytes.data()),
              static_cast<std::streamsize>(t.bytes.size()));
    const uint64_t pad = (alignment - t.bytes.size() % alignment) % alignment;
    out.write(zeros.data(), static_cast<std::streamsize>(pad));
  }
  out.close();
  if (!out) return Error{fmt::format("{}: write failed: {}", shown, std::strerror(errno))};
  return ok_status();
}

}  // namespace inferlab::gguf
