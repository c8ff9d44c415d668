#include "formats/safetensors.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>

#include "gguf/half.h"

namespace inferlab::safetensors {

namespace {

// A header larger than this is refused before it is read (the reference
// library's own limit is 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

Result<DType> parse_dtype(const std::string& name) {
  if (name == "F32") return DType::F32;
  if (name == "F16") return DType::F16;
  if (name == "BF16") return DType::BF16;
  return Error{fmt::format("dtype {} (this reader converts F32, F16 and BF16)", name)};
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
  }
  return "?";
}

int64_t dtype_bytes(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

int64_t TensorInfo::n_elems() const {
  int64_t n = 1;
  for (const int64_t d : shape) n *= d;
  return n;
}

Result<File> File::open(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error{fmt::format("{}: cannot open for reading", path.string())};
  in.seekg(0, std::ios::end);
  const auto size = in.tellg();
  if (size < 0) return Error{fmt::format("{}: cannot read its size", path.string())};
  in.seekg(0);
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  if (!in.read(reinterpret_cast<char*>(bytes.data()), std::streamsize(bytes.size())))
    return Error{fmt::format("{}: read failed", path.string())};
  return from_bytes(std::move(bytes), path.string());
}

Result<File> File::from_bytes(std::vector<uint8_t> bytes, std::string origin) {
  File f;
  f.origin_ = std::move(origin);
  auto fail = [&](const std::string& why) { return Error{fmt::format("{}: {}", f.origin_, why)}; };
  if (bytes.size() < 8) return fail(fmt::format("{} bytes: too short for a safetensors header length", bytes.size()));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[size_t(i)];
  if (n > kMaxHeaderBytes || n > bytes.size() - 8)
    return fail(fmt::format("the header length {} runs past the file's {} bytes (or over {} MiB)", n, bytes.size(),
                            kMaxHeaderBytes >> 20));
  const auto* text = reinterpret_cast<const char*>(bytes.data() + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, text + n);
  } catch (const nlohmann::json::exception& e) {
    return fail(fmt::format("the header is not JSON ({})", e.what()));
  }
  if (!header.is_object()) return fail("the header is not a JSON object");
  f.data_start_ = 8 + n;
  const uint64_t data_bytes = bytes.size() - f.data_start_;
  for (const auto& item : header.items()) {  // not a structured binding: the lambdas below capture the name
    const std::string name = item.key();
    const nlohmann::json& entry = item.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) return fail("__metadata__ is not an object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) return fail(fmt::format("__metadata__ {}: not a string", key));
        f.metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& why) { return fail(fmt::format("tensor {}: {}", name, why)); };
    if (!entry.is_object()) return bad("not an object");
    if (!entry.contains("dtype") || !entry["dtype"].is_string()) return bad("no dtype");
    if (!entry.contains("shape") || !entry["shape"].is_array()) return bad("no shape");
    if (!entry.contains("data_offsets") || !entry["data_offsets"].is_array() || entry["data_offsets"].size() != 2)
      return bad("no data_offsets [begin, end]");
    TensorInfo t;
    t.name = name;
    auto dtype = parse_dtype(entry["dtype"].get<std::string>());
    if (!dtype) return bad(dtype.message());
    t.dtype = *dtype;
    int64_t elems = 1;
    for (const auto& d : entry["shape"]) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > uint64_t(std::numeric_limits<int32_t>::max()))
        return bad("a shape entry is not a size");
      const int64_t v = int64_t(d.get<uint64_t>());
      if (v != 0 && elems > std::numeric_limits<int64_t>::max() / 8 / v) return bad("the shape is too large");
      elems *= v;
      t.shape.push_back(v);
    }
    const auto& offsets = entry["data_offsets"];
    if (!offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned()) return bad("data_offsets are not sizes");
    t.begin = offsets[0].get<uint64_t>();
    t.end = offsets[1].get<uint64_t>();
    if (t.begin > t.end || t.end > data_bytes)
      return bad(fmt::format("data_offsets [{}, {}] outside the {} data bytes", t.begin, t.end, data_bytes));
    if (t.end - t.begin != uint64_t(elems * dtype_bytes(t.dtype)))
      return bad(fmt::format("{} bytes for a {} tensor of {} values", t.end - t.begin, dtype_name(t.dtype), elems));
    f.index_[name] = f.tensors_.size();
    f.tensors_.push_back(std::move(t));
  }
  // Byte ranges may not overlap (the format lays tensors end to end).
  std::vector<const TensorInfo*> order;
  for (const auto& t : f.tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  const TensorInfo* reaching = nullptr;  // the non-empty tensor that ends furthest so far
  for (const TensorInfo* t : order) {
    if (t->end == t->begin) continue;
    if (reaching != nullptr && t->begin < reaching->end)
      return fail(fmt::format("tensors {} and {} share bytes", reaching->name, t->name));
    if (reaching == nullptr || t->end > reaching->end) reaching = t;
  }
  f.bytes_ = std::move(bytes);
  return f;
}

const TensorInfo* File::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

std::vector<float> File::read_f32(const TensorInfo& t) const {
  std::vector<float> out(static_cast<size_t>(t.n_elems()));
  const uint8_t* p = bytes_.data() + data_start_ + t.begin;
  for (size_t i = 0; i < out.size(); ++i) {
    switch (t.dtype) {
      case DType::F32: std::memcpy(&out[i], p + 4 * i, 4); break;
      case DType::F16: out[i] = fp16_to_fp32(uint16_t(p[2 * i] | (p[2 * i + 1] << 8))); break;
      case DType::BF16: out[i] = bf16_to_fp32(uint16_t(p[2 * i] | (p[2 * i + 1] << 8))); break;
    }
  }
  return out;
}

Status write_f32(const std::filesystem::path& path, const std::vector<F32Tensor>& tensors,
                 const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    int64_t n = 1;
    for (const int64_t d : t.shape) n *= d;
    if (n != int64_t(t.values.size()))
      return Error{fmt::format("{}: tensor {}: {} values for a shape of {}", path.string(), t.name, t.values.size(), n)};
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + 4 * uint64_t(n)}}};
    offset += 4 * uint64_t(n);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Error{fmt::format("{}: cannot open for writing", path.string())};
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out.put(char(uint8_t(n >> (8 * i))));
  out << text;
  for (const auto& t : tensors)
    out.write(reinterpret_cast<const char*>(t.values.data()), std::streamsize(t.values.size() * sizeof(float)));
  if (!out.flush()) return Error{fmt::format("{}: write failed", path.string())};
  return ok_status();
}

}  // namespace inferlab::safetensors
