// GGUF reader: maps the file read-only and validates every byte it interprets.
// Metadata values are stored by kind: unsigned integers as uint64_t, signed as
// int64_t, FLOAT32/FLOAT64 as double, BOOL as bool, STRING as std::string.
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>

#include "gguf/gguf.h"

namespace inferlab::gguf {

static_assert(std::endian::native == std::endian::little, "GGUF is read in place, little-endian");

namespace {

constexpr uint64_t kHeaderBytes = 4 + 4 + 8 + 8;  // magic, version, tensor count, kv count
constexpr size_t kMaxArrayDepth = 8;              // nested arrays are legal but rare
constexpr uint32_t kMaxDims = 4;                  // GGML_MAX_DIMS

// Smallest encodings, used to reject counts the remaining bytes cannot hold
// before anything is allocated for them.
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;                  // empty key, type, 1-byte value
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;  // empty name, 1 dim

// Names from the file go into one-line messages: escape control bytes and cap length.
std::string printable(std::string_view s) {
  constexpr size_t kMaxShown = 80;
  std::string out;
  for (size_t i = 0; i < s.size() && i < kMaxShown; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f || c == '\'' || c == '\\') {
      out += fmt::format("\\x{:02x}", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > kMaxShown) out += fmt::format("...({} bytes)", s.size());
  return out;
}

bool is_integer(ValueType t) {
  switch (t) {
    case ValueType::UINT8:
    case ValueType::INT8:
    case ValueType::UINT16:
    case ValueType::INT16:
    case ValueType::UINT32:
    case ValueType::INT32:
    case ValueType::UINT64:
    case ValueType::INT64:
      return true;
    default:
      return false;
  }
}

bool is_known_value_type(uint32_t t) { return t <= static_cast<uint32_t>(ValueType::FLOAT64); }

// Bytes of one scalar value; 0 for STRING and ARRAY (variable size).
uint64_t scalar_bytes(ValueType t) {
  switch (t) {
    case ValueType::UINT8:
    case ValueType::INT8:
    case ValueType::BOOL:
      return 1;
    case ValueType::UINT16:
    case ValueType::INT16:
      return 2;
    case ValueType::UINT32:
    case ValueType::INT32:
    case ValueType::FLOAT32:
      return 4;
    case ValueType::UINT64:
    case ValueType::INT64:
    case ValueType::FLOAT64:
      return 8;
    default:
      return 0;
  }
}

// Smallest possible encoding of one array element of type `t`.
uint64_t min_elem_bytes(ValueType t) {
  if (t == ValueType::STRING) return 8;
  if (t == ValueType::ARRAY) return 4 + 8;
  return scalar_bytes(t);
}

std::optional<int64_t> as_int(const Value& v) {
  if (!is_integer(v.type)) return std::nullopt;
  if (const auto* u = std::get_if<uint64_t>(&v.scalar)) {
    if (*u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(*u);
  }
  if (const auto* i = std::get_if<int64_t>(&v.scalar)) return *i;
  return std::nullopt;
}

std::optional<double> as_float(const Value& v) {
  if (v.type == ValueType::FLOAT32 || v.type == ValueType::FLOAT64) {
    if (const auto* d = std::get_if<double>(&v.scalar)) return *d;
    return std::nullopt;
  }
  if (const auto* u = std::get_if<uint64_t>(&v.scalar); u && is_integer(v.type)) {
    return static_cast<double>(*u);
  }
  if (const auto* i = std::get_if<int64_t>(&v.scalar); i && is_integer(v.type)) {
    return static_cast<double>(*i);
  }
  return std::nullopt;
}

// Parses the mapped bytes; File::open moves the results out. Every read checks
// bounds first; error messages are built only on the failure path.
class Parser {
 public:
  Parser(const std::string& path, const uint8_t* base, uint64_t size)
      : path_(path), base_(base), size_(size) {}

  Status parse();

  uint32_t version = 0;
  uint64_t alignment = 32;  // the GGUF default when general.alignment is absent
  std::map<std::string, Value> metadata;
  std::vector<TensorInfo> tensors;
  std::map<std::string, size_t, std::less<>> tensor_index;

 private:
  Status parse_header(uint64_t& n_tensors, uint64_t& n_kv);
  Status parse_metadata(uint64_t n_kv);
  Status parse_alignment();
  Status parse_tensor_directory(uint64_t n_tensors);
  Status place_tensor_data();

  Error fail(const std::string& what) const { return Error{fmt::format("{}: {}", path_, what)}; }
  // Only for fixed-size reads (need <= 8), so pos_ + need cannot overflow.
  Error truncated(const std::string& what, uint64_t need) const {
    return fail(fmt::format("truncated: {} at byte {} ends at byte {} but the file has {} bytes",
                            what, pos_, pos_ + need, size_));
  }
  bool has(uint64_t n) const { return n <= size_ - pos_; }
  template <typename T>
  T take() {  // caller checked has(sizeof(T))
    T v;
    std::memcpy(&v, base_ + pos_, sizeof v);
    pos_ += sizeof v;
    return v;
  }
  // `what` is a callable returning the description used in the error message.
  template <typename T, typename What>
  Result<T> read(const What& what) {
    if (!has(sizeof(T))) return truncated(what(), sizeof(T));
    return take<T>();
  }
  template <typename What>
  Result<std::string> read_string(const What& what);
  // `where` names the metadata key; `path` holds the indices of enclosing arrays.
  Status read_value(ValueType type, Value& out, const std::string& where,
                    std::vector<uint64_t>& path);
  Status read_array(Value& out, const std::string& where, std::vector<uint64_t>& path);
  template <typename T, typename Stored, typename What>
  Status read_scalar(Value& out, const What& what) {
    auto v = read<T>(what);
    if (!v) return v.error();
    out.scalar = static_cast<Stored>(*v);
    return ok_status();
  }
  Status parse_tensor_info(uint64_t index, TensorInfo& info);

  std::string path_;
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

template <typename What>
Result<std::string> Parser::read_string(const What& what) {
  auto len = read<uint64_t>([&] { return what() + " (string length)"; });
  if (!len) return len.error();
  if (!has(*len)) {
    return fail(
        fmt::format("{}: string length {} at byte {} runs past the end of the file ({} "
                    "bytes, {} left)",
                    what(), *len, pos_ - 8, size_, size_ - pos_));
  }
  std::string s(reinterpret_cast<const char*>(base_ + pos_), static_cast<size_t>(*len));
  pos_ += *len;
  return s;
}

std::string describe(const std::string& where, const std::vector<uint64_t>& path) {
  std::string out = where;
  for (uint64_t i : path) out += fmt::format(" element {}", i);
  return out;
}

Status Parser::read_value(ValueType type, Value& out, const std::string& where,
                          std::vector<uint64_t>& path) {
  auto what = [&] { return describe(where, path); };
  out.type = type;
  switch (type) {
    case ValueType::UINT8:
      return read_scalar<uint8_t, uint64_t>(out, what);
    case ValueType::UINT16:
      return read_scalar<uint16_t, uint64_t>(out, what);
    case ValueType::UINT32:
      return read_scalar<uint32_t, uint64_t>(out, what);
    case ValueType::UINT64:
      return read_scalar<uint64_t, uint64_t>(out, what);
    case ValueType::INT8:
      return read_scalar<int8_t, int64_t>(out, what);
    case ValueType::INT16:
      return read_scalar<int16_t, int64_t>(out, what);
    case ValueType::INT32:
      return read_scalar<int32_t, int64_t>(out, what);
    case ValueType::INT64:
      return read_scalar<int64_t, int64_t>(out, what);
    case ValueType::FLOAT32:
      return read_scalar<float, double>(out, what);
    case ValueType::FLOAT64:
      return read_scalar<double, double>(out, what);
    case ValueType::BOOL: {
      auto v = read<uint8_t>(what);
      if (!v) return v.error();
      if (*v > 1) return fail(fmt::format("{}: bool byte is {}, not 0 or 1", what(), *v));
      out.scalar = *v == 1;
      return ok_status();
    }
    case ValueType::STRING: {
      auto str = read_string(what);
      if (!str) return str.error();
      out.scalar = std::move(*str);
      return ok_status();
    }
    case ValueType::ARRAY:
      return read_array(out, where, path);
  }
  return fail(fmt::format("{}: unknown value type id {}", what(), static_cast<uint32_t>(type)));
}

Status Parser::read_array(Value& out, const std::string& where, std::vector<uint64_t>& path) {
  auto what = [&] { return describe(where, path); };
  // Bounded so that a hostile file cannot exhaust the stack.
  if (path.size() >= kMaxArrayDepth) {
    return fail(fmt::format("{}: arrays nested more than {} deep", what(), kMaxArrayDepth));
  }
  auto elem = read<uint32_t>([&] { return what() + " (array element type)"; });
  if (!elem) return elem.error();
  if (!is_known_value_type(*elem)) {
    return fail(fmt::format("{}: array has unknown element type id {}", what(), *elem));
  }
  out.elem_type = static_cast<ValueType>(*elem);
  auto count = read<uint64_t>([&] { return what() + " (array length)"; });
  if (!count) return count.error();
  if (*count > (size_ - pos_) / min_elem_bytes(out.elem_type)) {
    return fail(
        fmt::format("{}: array of {} elements at byte {} cannot fit in the {} bytes left "
                    "in the file",
                    what(), *count, pos_ - 8, size_ - pos_));
  }
  out.array.resize(static_cast<size_t>(*count));
  path.push_back(0);
  for (uint64_t i = 0; i < *count; ++i) {
    path.back() = i;
    Status s = read_value(out.elem_type, out.array[i], where, path);
    if (!s) return s;
  }
  path.pop_back();
  return ok_status();
}

Status Parser::parse_tensor_info(uint64_t index, TensorInfo& info) {
  auto entry = [&] { return fmt::format("tensor directory entry {}", index); };
  auto name = read_string(entry);
  if (!name) return name.error();
  info.name = std::move(*name);
  const std::string quoted = fmt::format("'{}'", printable(info.name));
  auto where = [&] { return fmt::format("tensor directory entry {} ({})", index, quoted); };

  auto n_dims = read<uint32_t>([&] { return where() + " dimension count"; });
  if (!n_dims) return n_dims.error();
  if (*n_dims < 1 || *n_dims > kMaxDims) {
    return fail(
        fmt::format("tensor {} has {} dimensions; must be 1 to {}", quoted, *n_dims, kMaxDims));
  }
  info.dims.clear();
  uint64_t n_elems = 1;
  for (uint32_t d = 0; d < *n_dims; ++d) {
    auto dim = read<uint64_t>([&] { return where() + " dimensions"; });
    if (!dim) return dim.error();
    if (*dim == 0 || *dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return fail(fmt::format(
          "tensor {} has dimension {} = {}; every dimension must be 1 to 2^63-1", quoted, d, *dim));
    }
    if (__builtin_mul_overflow(n_elems, *dim, &n_elems) ||
        n_elems > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return fail(
          fmt::format("tensor {} has too many elements (dimensions overflow 2^63)", quoted));
    }
    info.dims.push_back(static_cast<int64_t>(*dim));
  }
  auto type_id = read<uint32_t>([&] { return where() + " type"; });
  if (!type_id) return type_id.error();
  const auto traits = type_traits(*type_id);
  if (!traits) return fail(fmt::format("tensor {} has unknown type id {}", quoted, *type_id));
  info.type = static_cast<TensorType>(*type_id);
  if (info.dims[0] % traits->block_elems != 0) {
    return fail(fmt::format("tensor {} has dims[0] = {}, not a multiple of the {} block size {}",
                            quoted, info.dims[0], traits->name, traits->block_elems));
  }
  const uint64_t n_blocks = n_elems / static_cast<uint64_t>(traits->block_elems);
  if (__builtin_mul_overflow(n_blocks, static_cast<uint64_t>(traits->block_bytes), &info.n_bytes)) {
    return fail(fmt::format("tensor {} is too large (byte size overflows 64 bits)", quoted));
  }
  auto offset = read<uint64_t>([&] { return where() + " data offset"; });
  if (!offset) return offset.error();
  info.offset = *offset;
  return ok_status();
}

Status Parser::parse() {
  uint64_t n_tensors = 0, n_kv = 0;
  if (Status s = parse_header(n_tensors, n_kv); !s) return s;
  if (Status s = parse_metadata(n_kv); !s) return s;
  if (Status s = parse_alignment(); !s) return s;
  if (Status s = parse_tensor_directory(n_tensors); !s) return s;
  return place_tensor_data();
}

Status Parser::parse_header(uint64_t& n_tensors, uint64_t& n_kv) {
  if (size_ == 0) return fail("empty file (0 bytes); not a GGUF file");
  const uint64_t magic_seen = std::min<uint64_t>(size_, 4);
  if (std::memcmp(base_, "GGUF", static_cast<size_t>(magic_seen)) != 0) {
    std::string hex;
    for (uint64_t i = 0; i < magic_seen; ++i) hex += fmt::format("{:02x}", base_[i]);
    return fail(fmt::format("not a GGUF file: bad magic 0x{} (expected 'GGUF' = 0x47475546)", hex));
  }
  if (!has(kHeaderBytes)) return truncated("header", kHeaderBytes);
  pos_ = 4;
  version = take<uint32_t>();
  if (version == 1) {
    return fail(
        "GGUF version 1 is not supported (only versions 2 and 3); re-convert the model "
        "with a current llama.cpp");
  }
  if (version != 2 && version != 3) {
    const uint32_t swapped = __builtin_bswap32(version);
    if (swapped == 2 || swapped == 3) {
      return fail(
          fmt::format("big-endian GGUF file (version {}); only little-endian files are "
                      "supported",
                      swapped));
    }
    return fail(fmt::format("unsupported GGUF version {} (supported: 2 and 3)", version));
  }
  n_tensors = take<uint64_t>();
  n_kv = take<uint64_t>();
  if (n_kv > (size_ - pos_) / kMinKvBytes) {
    return fail(
        fmt::format("header claims {} metadata entries but only {} bytes follow the "
                    "header; the file is corrupt or truncated",
                    n_kv, size_ - pos_));
  }
  return ok_status();
}

Status Parser::parse_metadata(uint64_t n_kv) {
  std::map<std::string, uint64_t, std::less<>> key_entry;  // for duplicate-key messages
  for (uint64_t i = 0; i < n_kv; ++i) {
    auto key = read_string([&] { return fmt::format("metadata entry {} of {}", i, n_kv); });
    if (!key) return key.error();
    const std::string quoted = fmt::format("'{}'", printable(*key));
    const std::string where = fmt::format("metadata key {} (entry {})", quoted, i);
    auto type = read<uint32_t>([&] { return where + " value type"; });
    if (!type) return type.error();
    if (!is_known_value_type(*type)) {
      return fail(fmt::format("{} has unknown value type id {}", where, *type));
    }
    Value value;
    std::vector<uint64_t> array_path;
    Status s = read_value(static_cast<ValueType>(*type), value, where, array_path);
    if (!s) return s;
    if (auto [it, inserted] = key_entry.emplace(*key, i); !inserted) {
      return fail(
          fmt::format("duplicate metadata key {} (entries {} and {})", quoted, it->second, i));
    }
    metadata.emplace(std::move(*key), std::move(value));
  }
  return ok_status();
}

Status Parser::parse_alignment() {
  auto it = metadata.find("general.alignment");
  if (it == metadata.end()) return ok_status();
  const auto a = as_int(it->second);
  if (!a || *a <= 0 || !std::has_single_bit(static_cast<uint64_t>(*a))) {
    const std::string shown = a ? fmt::format("{}", *a) : "a non-integer value";
    return fail(fmt::format("general.alignment must be a nonzero power of two, got {}", shown));
  }
  alignment = static_cast<uint64_t>(*a);  // at most 2^62, so align-up cannot overflow
  return ok_status();
}

Status Parser::parse_tensor_directory(uint64_t n_tensors) {
  if (n_tensors > (size_ - pos_) / kMinTensorInfoBytes) {
    return fail(
        fmt::format("header claims {} tensors but only {} bytes follow the metadata; the "
                    "file is corrupt or truncated",
                    n_tensors, size_ - pos_));
  }
  tensors.resize(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    if (Status s = parse_tensor_info(i, tensors[i]); !s) return s;
    auto [it, inserted] = tensor_index.emplace(tensors[i].name, static_cast<size_t>(i));
    if (!inserted) {
      return fail(fmt::format("duplicate tensor name '{}' (directory entries {} and {})",
                              printable(tensors[i].name), it->second, i));
    }
  }
  return ok_status();
}

// The data section starts at the first multiple of the alignment after the
// directory; every tensor must start aligned within it and end inside the file.
Status Parser::place_tensor_data() {
  const uint64_t data_start = (pos_ + alignment - 1) / alignment * alignment;
  for (TensorInfo& t : tensors) {
    const std::string quoted = fmt::format("'{}'", printable(t.name));
    if (t.offset % alignment != 0) {
      return fail(fmt::format("tensor {} has data offset {}, not a multiple of the alignment {}",
                              quoted, t.offset, alignment));
    }
    uint64_t begin = 0, end = 0;
    const bool wraps = __builtin_add_overflow(data_start, t.offset, &begin) ||
                       __builtin_add_overflow(begin, t.n_bytes, &end);
    if (wraps || end > size_) {
      return fail(
          fmt::format("truncated: tensor {} data ({} bytes at data offset {}) ends at "
                      "byte {} but the file has {} bytes",
                      quoted, t.n_bytes, t.offset,
                      wraps ? std::string("beyond 2^64") : fmt::format("{}", end), size_));
    }
    t.data = base_ + begin;
  }
  return ok_status();
}

}  // namespace

int64_t TensorInfo::n_elems() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

Result<std::shared_ptr<File>> File::open(const std::filesystem::path& path) {
  const std::string shown = path.string();
  const int fd = ::open(shown.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error{fmt::format("{}: cannot open: {}", shown, std::strerror(errno))};
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return Error{fmt::format("{}: cannot stat: {}", shown, std::strerror(err))};
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Error{fmt::format("{}: not a regular file", shown)};
  }
  std::shared_ptr<File> file(new File());
  file->path_ = path;
  file->size_ = static_cast<uint64_t>(st.st_size);
  if (file->size_ > 0) {  // mmap refuses length 0; the parser reports the empty file
    void* map = ::mmap(nullptr, static_cast<size_t>(file->size_), PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return Error{
          fmt::format("{}: cannot map {} bytes: {}", shown, file->size_, std::strerror(err))};
    }
    file->base_ = static_cast<const uint8_t*>(map);
  }
  ::close(fd);  // the mapping keeps the file alive

  file->mapped_ = file->base_ != nullptr;
  return parse_into(std::move(file), shown);  // on error, ~File unmaps
}

Result<std::shared_ptr<File>> File::from_bytes(std::vector<uint8_t> bytes, const std::string& name) {
  std::shared_ptr<File> file(new File());
  file->path_ = name;
  file->owned_ = std::move(bytes);
  file->size_ = file->owned_.size();
  file->base_ = file->owned_.empty() ? nullptr : file->owned_.data();
  return parse_into(std::move(file), name);
}

Result<std::shared_ptr<File>> File::parse_into(std::shared_ptr<File> file, const std::string& shown) {
  Parser parser(shown, file->base_, file->size_);
  if (Status s = parser.parse(); !s) return s.error();
  file->version_ = parser.version;
  file->alignment_ = parser.alignment;
  file->metadata_ = std::move(parser.metadata);
  file->tensors_ = std::move(parser.tensors);
  file->tensor_index_ = std::move(parser.tensor_index);
  return file;
}

File::~File() {
  if (mapped_) ::munmap(const_cast<uint8_t*>(base_), static_cast<size_t>(size_));
}

const Value* File::find(std::string_view key) const {
  auto it = metadata_.find(std::string(key));
  return it == metadata_.end() ? nullptr : &it->second;
}

std::optional<int64_t> File::get_int(std::string_view key) const {
  const Value* v = find(key);
  return v ? as_int(*v) : std::nullopt;
}

std::optional<double> File::get_float(std::string_view key) const {
  const Value* v = find(key);
  return v ? as_float(*v) : std::nullopt;
}

std::optional<bool> File::get_bool(std::string_view key) const {
  const Value* v = find(key);
  if (!v || v->type != ValueType::BOOL) return std::nullopt;
  return std::get<bool>(v->scalar);
}

std::optional<std::string> File::get_string(std::string_view key) const {
  const Value* v = find(key);
  if (!v || v->type != ValueType::STRING) return std::nullopt;
  return std::get<std::string>(v->scalar);
}

std::optional<std::vector<std::string>> File::get_string_array(std::string_view key) const {
  const Value* v = find(key);
  if (!v || v->type != ValueType::ARRAY || v->elem_type != ValueType::STRING) return std::nullopt;
  std::vector<std::string> out;
  out.reserve(v->array.size());
  for (const Value& e : v->array) out.push_back(std::get<std::string>(e.scalar));
  return out;
}

std::optional<std::vector<int64_t>> File::get_int_array(std::string_view key) const {
  const Value* v = find(key);
  if (!v || v->type != ValueType::ARRAY || !is_integer(v->elem_type)) return std::nullopt;
  std::vector<int64_t> out;
  out.reserve(v->array.size());
  for (const Value& e : v->array) {
    const auto i = as_int(e);
    if (!i) return std::nullopt;  // a uint64 past INT64_MAX
    out.push_back(*i);
  }
  return out;
}

std::optional<std::vector<double>> File::get_float_array(std::string_view key) const {
  const Value* v = find(key);
  if (!v || v->type != ValueType::ARRAY) return std::nullopt;
  if (v->elem_type != ValueType::FLOAT32 && v->elem_type != ValueType::FLOAT64 &&
      !is_integer(v->elem_type)) {
    return std::nullopt;
  }
  std::vector<double> out;
  out.reserve(v->array.size());
  for (const Value& e : v->array) out.push_back(*as_float(e));
  return out;
}

const TensorInfo* File::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace inferlab::gguf
