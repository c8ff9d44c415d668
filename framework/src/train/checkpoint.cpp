// Head checkpoints. The file, little-endian:
//   "ILTRHEAD"  8-byte magic
//   u32 format version (1), u32 flags (1: relu, 2: bias)
//   i64 in, i64 rank, i64 out
//   float32 W1 (rank x in), W2 (out x hidden), b2 (out, with bias)
//   u64 FNV-1a 64 of every byte before it
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>

#include "inferlab/train.h"

namespace inferlab::train {
namespace {

static_assert(std::endian::native == std::endian::little, "checkpoints are read and written as little-endian");

constexpr char kMagic[8] = {'I', 'L', 'T', 'R', 'H', 'E', 'A', 'D'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 8 + 4 + 4 + 3 * 8;

uint64_t fnv1a(const char* data, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint8_t>(data[i])) * 0x100000001b3ull;
  return h;
}

template <typename T>
void put(std::string& out, const T& v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

template <typename T>
T get(const std::string& in, size_t offset) {
  T v;
  std::memcpy(&v, in.data() + offset, sizeof(T));
  return v;
}

// Writes bytes to a temporary file beside path and renames it over path, so a
// reader (or a process killed mid-write) never sees a partial file.
Status write_atomically(const std::string& path, const std::string& bytes, const std::string& what) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    f.close();
    if (!f) return Error{what + " " + path + ": cannot write " + tmp};
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return Error{what + " " + path + ": cannot rename " + tmp + ": " + ec.message()};
  return ok_status();
}

Result<std::string> read_all(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Error{what + " " + path + ": cannot open the file"};
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) return Error{what + " " + path + ": cannot read the file"};
  return bytes;
}

std::vector<float> floats(const std::string& in, size_t offset, int64_t count) {
  std::vector<float> v(static_cast<size_t>(count));
  if (!v.empty()) std::memcpy(v.data(), in.data() + offset, v.size() * sizeof(float));
  return v;
}

}  // namespace

Status save(const LowRankHead& head, const std::string& path) {
  const HeadOptions& o = head.options();
  std::string bytes(kMagic, sizeof(kMagic));
  put(bytes, kVersion);
  put(bytes, static_cast<uint32_t>((o.relu ? 1u : 0u) | (o.bias ? 2u : 0u)));
  put(bytes, o.in);
  put(bytes, o.rank);
  put(bytes, o.out);
  for (const auto* t : {&head.w1(), &head.w2(), &head.b2()})
    bytes.append(reinterpret_cast<const char*>(t->data()), t->size() * sizeof(float));
  put(bytes, fnv1a(bytes.data(), bytes.size()));
  return write_atomically(path, bytes, "train checkpoint");
}

Result<LowRankHead> load(const std::string& path) {
  auto fail = [&](const std::string& what) -> Error { return Error{"train checkpoint " + path + ": " + what}; };
  auto read = read_all(path, "train checkpoint");
  if (!read) return read.error();
  const std::string& bytes = *read;
  if (bytes.size() < kHeaderBytes + 8)
    return fail("truncated: " + std::to_string(bytes.size()) + " bytes, less than a header and checksum");
  if (std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) return fail("wrong magic: not a head checkpoint");
  if (const auto version = get<uint32_t>(bytes, 8); version != kVersion)
    return fail("format version " + std::to_string(version) + ", this build reads " + std::to_string(kVersion));
  const auto flags = get<uint32_t>(bytes, 12);
  const HeadOptions o{get<int64_t>(bytes, 16), get<int64_t>(bytes, 24), get<int64_t>(bytes, 32), (flags & 1u) != 0,
                      (flags & 2u) != 0};
  if (flags > 3u || o.in <= 0 || o.rank < 0 || o.out <= 0)
    return fail("bad shape fields: in " + std::to_string(o.in) + ", rank " + std::to_string(o.rank) + ", out " +
                std::to_string(o.out) + ", flags " + std::to_string(flags));
  // In double first: a corrupt shape must not overflow the size computed from it.
  const double hidden = static_cast<double>(o.rank > 0 ? o.rank : o.in);
  const double need = static_cast<double>(kHeaderBytes + 8) +
                      4.0 * (static_cast<double>(o.rank) * static_cast<double>(o.in) +
                             static_cast<double>(o.out) * hidden + (o.bias ? static_cast<double>(o.out) : 0.0));
  if (need != static_cast<double>(bytes.size()))
    return fail(std::to_string(bytes.size()) + " bytes, but in " + std::to_string(o.in) + ", rank " +
                std::to_string(o.rank) + ", out " + std::to_string(o.out) + " need " +
                (need < 0x1p62 ? std::to_string(static_cast<int64_t>(need)) : std::string("over 2^62")) +
                " (truncated or corrupt)");
  const size_t body = bytes.size() - 8;
  if (fnv1a(bytes.data(), body) != get<uint64_t>(bytes, body)) return fail("checksum mismatch: the file is corrupt");
  const int64_t n1 = o.rank * o.in, n2 = o.out * (o.rank > 0 ? o.rank : o.in);
  auto head = LowRankHead::from_parameters(o, floats(bytes, kHeaderBytes, n1),
                                           floats(bytes, kHeaderBytes + 4 * static_cast<size_t>(n1), n2),
                                           floats(bytes, kHeaderBytes + 4 * static_cast<size_t>(n1 + n2),
                                                  o.bias ? o.out : 0));
  if (!head) return fail(head.message());
  return head;
}

Result<LowRankHead> load(const std::string& path, const HeadOptions& expected) {
  auto head = load(path);
  if (!head) return head;
  const HeadOptions& o = head->options();
  if (o.in != expected.in || o.rank != expected.rank || o.out != expected.out || o.relu != expected.relu ||
      o.bias != expected.bias)
    return Error{"train checkpoint " + path + ": shape mismatch: the file holds in " + std::to_string(o.in) +
                 ", rank " + std::to_string(o.rank) + ", out " + std::to_string(o.out) + ", relu " +
                 std::to_string(o.relu) + ", bias " + std::to_string(o.bias) + "; expected in " +
                 std::to_string(expected.in) + ", rank " + std::to_string(expected.rank) + ", out " +
                 std::to_string(expected.out) + ", relu " + std::to_string(expected.relu) + ", bias " +
                 std::to_string(expected.bias)};
  return head;
}

// State files. Little-endian:
//   "ILTRSTAT" 8-byte magic, u32 format version (1), u32 record count
//   per record: u32 name length, name, u8 kind, u64 byte length, bytes
//   u64 FNV-1a 64 of every byte before it
namespace {
constexpr char kStateMagic[8] = {'I', 'L', 'T', 'R', 'S', 'T', 'A', 'T'};
constexpr uint32_t kStateVersion = 1;
const char* kind_name(uint8_t kind) { return kind == 1 ? "floats" : kind == 2 ? "an integer" : "text"; }
}  // namespace

void StateFile::set_record(const std::string& name, uint8_t kind, std::string bytes) {
  for (auto& [n, r] : records_)
    if (n == name) {
      r = Record{kind, std::move(bytes)};
      return;
    }
  records_.emplace_back(name, Record{kind, std::move(bytes)});
}

void StateFile::put_floats(const std::string& name, std::span<const float> values) {
  set_record(name, 1, std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float)));
}
void StateFile::put_int(const std::string& name, int64_t value) {
  set_record(name, 2, std::string(reinterpret_cast<const char*>(&value), sizeof(value)));
}
void StateFile::put_text(const std::string& name, const std::string& text) { set_record(name, 3, text); }

const StateFile::Record* StateFile::find(const std::string& name) const {
  for (const auto& [n, r] : records_)
    if (n == name) return &r;
  return nullptr;
}
bool StateFile::has(const std::string& name) const { return find(name) != nullptr; }

Result<std::vector<float>> StateFile::floats(const std::string& name) const {
  const Record* r = find(name);
  if (r == nullptr) return Error{"state file: no record " + name};
  if (r->kind != 1) return Error{"state file: record " + name + " holds " + kind_name(r->kind) + ", not floats"};
  std::vector<float> v(r->bytes.size() / sizeof(float));
  if (!v.empty()) std::memcpy(v.data(), r->bytes.data(), v.size() * sizeof(float));
  return v;
}

Result<int64_t> StateFile::integer(const std::string& name) const {
  const Record* r = find(name);
  if (r == nullptr) return Error{"state file: no record " + name};
  if (r->kind != 2) return Error{"state file: record " + name + " holds " + kind_name(r->kind) + ", not an integer"};
  return get<int64_t>(r->bytes, 0);
}

Result<std::string> StateFile::text(const std::string& name) const {
  const Record* r = find(name);
  if (r == nullptr) return Error{"state file: no record " + name};
  if (r->kind != 3) return Error{"state file: record " + name + " holds " + kind_name(r->kind) + ", not text"};
  return r->bytes;
}

Status StateFile::save(const std::string& path) const {
  std::string bytes(kStateMagic, sizeof(kStateMagic));
  put(bytes, kStateVersion);
  put(bytes, static_cast<uint32_t>(records_.size()));
  for (const auto& [name, r] : records_) {
    put(bytes, static_cast<uint32_t>(name.size()));
    bytes += name;
    put(bytes, r.kind);
    put(bytes, static_cast<uint64_t>(r.bytes.size()));
    bytes += r.bytes;
  }
  put(bytes, fnv1a(bytes.data(), bytes.size()));
  return write_atomically(path, bytes, "state file");
}

Result<StateFile> StateFile::load(const std::string& path) {
  auto fail = [&](const std::string& what) -> Error { return Error{"state file " + path + ": " + what}; };
  auto read = read_all(path, "state file");
  if (!read) return read.error();
  const std::string& bytes = *read;
  if (bytes.size() < 8 + 4 + 4 + 8) return fail("truncated: " + std::to_string(bytes.size()) + " bytes");
  if (std::memcmp(bytes.data(), kStateMagic, sizeof(kStateMagic)) != 0) return fail("wrong magic: not a state file");
  if (const auto version = get<uint32_t>(bytes, 8); version != kStateVersion)
    return fail("format version " + std::to_string(version) + ", this build reads " + std::to_string(kStateVersion));
  const size_t body = bytes.size() - 8;
  if (fnv1a(bytes.data(), body) != get<uint64_t>(bytes, body)) return fail("checksum mismatch: the file is corrupt");
  StateFile file;
  const uint32_t count = get<uint32_t>(bytes, 12);
  size_t at = 16;
  for (uint32_t i = 0; i < count; ++i) {
    if (at + 4 > body) return fail("truncated in record " + std::to_string(i));
    const uint32_t name_len = get<uint32_t>(bytes, at);
    at += 4;
    if (name_len > body - at || body - at - name_len < 9) return fail("truncated in record " + std::to_string(i));
    std::string name = bytes.substr(at, name_len);
    at += name_len;
    const auto kind = static_cast<uint8_t>(bytes[at]);
    const uint64_t len = get<uint64_t>(bytes, at + 1);
    at += 9;
    if (kind < 1 || kind > 3) return fail("record " + name + " has unknown kind " + std::to_string(kind));
    if (len > body - at) return fail("record " + name + " runs past the end of the file");
    if ((kind == 1 && len % 4 != 0) || (kind == 2 && len != 8))
      return fail("record " + name + " has " + std::to_string(len) + " bytes, not whole " + kind_name(kind));
    if (file.has(name)) return fail("record " + name + " appears twice");
    file.set_record(name, kind, bytes.substr(at, len));
    at += len;
  }
  if (at != body) return fail(std::to_string(body - at) + " bytes after the last record");
  return file;
}

}  // namespace inferlab::train
