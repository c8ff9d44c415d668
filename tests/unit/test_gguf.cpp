// GGUF reader, writer, type table, (de)quantization and half-float conversion.
// Malformed files are built byte by byte with RawGguf, independently of the Writer.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "gguf/half.h"

namespace inferlab::gguf {
namespace test_gguf {

namespace fs = std::filesystem;

// ---- helpers ------------------------------------------------------------------

fs::path test_dir() {
  const char* env = std::getenv("INFERLAB_TEST_TMP");
  fs::path dir = env && *env ? fs::path(env) : fs::temp_directory_path();
  fs::create_directories(dir);
  return dir;
}

// A uniquely named file under the test directory, removed when it goes out of scope.
class TempFile {
 public:
  TempFile() {
    static int counter = 0;
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ =
        test_dir() / ("gguf_" + std::string(info->test_suite_name()) + "_" + info->name() + "_" +
                      std::to_string(::getpid()) + "_" + std::to_string(counter++) + ".gguf");
  }
  ~TempFile() {
    std::error_code ec;
    fs::remove(path_, ec);
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  const fs::path& path() const { return path_; }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

void write_bytes(const fs::path& path, const std::vector<uint8_t>& bytes, size_t n) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(n));
  ASSERT_TRUE(out.good()) << path;
}
void write_bytes(const fs::path& path, const std::vector<uint8_t>& bytes) {
  write_bytes(path, bytes, bytes.size());
}

std::vector<uint8_t> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// Opens `bytes` as a file and expects an error that starts with the path, is one
// line, and mentions every fragment.
void expect_open_error(const std::vector<uint8_t>& bytes,
                       std::initializer_list<std::string> fragments) {
  TempFile file;
  write_bytes(file.path(), bytes);
  auto result = File::open(file.path());
  ASSERT_FALSE(result.ok()) << "opened a malformed file";
  const std::string& msg = result.message();
  EXPECT_EQ(msg.rfind(file.str() + ": ", 0), 0u) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  for (const std::string& f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << msg;
}

// Little-endian byte builder for hand-made (and deliberately broken) GGUF files.
struct RawGguf {
  std::vector<uint8_t> b;

  template <typename T>
  RawGguf& put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof v);
    return *this;
  }
  RawGguf& u8(uint8_t v) { return put(v); }
  RawGguf& u32(uint32_t v) { return put(v); }
  RawGguf& u64(uint64_t v) { return put(v); }
  RawGguf& str(const std::string& s) {
    u64(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  RawGguf& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    b.insert(b.end(), {'G', 'G', 'U', 'F'});
    return u32(version).u64(n_tensors).u64(n_kv);
  }
  RawGguf& key(const std::string& k, ValueType t) { return str(k).u32(static_cast<uint32_t>(t)); }
  RawGguf& kv_u32(const std::string& k, uint32_t v) { return key(k, ValueType::UINT32).u32(v); }
  RawGguf& tensor(const std::string& name, std::vector<uint64_t> dims, uint32_t type,
                  uint64_t offset) {
    str(name).u32(static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) u64(d);
    return u32(type).u64(offset);
  }
  RawGguf& pad(size_t alignment = 32) {
    while (b.size() % alignment != 0) b.push_back(0);
    return *this;
  }
  RawGguf& zeros(size_t n) {
    b.insert(b.end(), n, 0);
    return *this;
  }
};

// One F32 tensor of 8 elements: the smallest useful valid file.
RawGguf one_f32_tensor_file() {
  RawGguf raw;
  raw.header(1, 0).tensor("x", {8}, 0, 0).pad().zeros(32);
  return raw;
}

void put_half(std::vector<uint8_t>& block, size_t at, float v) {
  const uint16_t h = fp32_to_fp16(v);
  std::memcpy(block.data() + at, &h, 2);
}

std::vector<float> dequantize_block(TensorType type, const std::vector<uint8_t>& block) {
  const auto traits = type_traits(static_cast<uint32_t>(type));
  EXPECT_TRUE(traits.has_value());
  EXPECT_EQ(block.size(), static_cast<size_t>(traits->block_bytes));
  std::vector<float> out(static_cast<size_t>(traits->block_elems));
  Status s = dequantize(type, block.data(), out.data(), traits->block_elems);
  EXPECT_TRUE(s.ok()) << s.message();
  return out;
}

// ---- half and bfloat16 --------------------------------------------------------

TEST(GgufHalf, KnownValues) {
  EXPECT_EQ(fp32_to_fp16(1.0f), 0x3c00);
  EXPECT_EQ(fp32_to_fp16(-2.0f), 0xc000);
  EXPECT_EQ(fp32_to_fp16(65504.0f), 0x7bff);
  EXPECT_EQ(fp32_to_fp16(0.0f), 0x0000);
  EXPECT_EQ(fp32_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(fp16_to_fp32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(fp16_to_fp32(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(fp16_to_fp32(0x3555), 0.333251953125f);
  EXPECT_EQ(fp16_to_fp32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(fp16_to_fp32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(fp16_to_fp32(0x7e00)));
  EXPECT_TRUE(std::signbit(fp16_to_fp32(0x8000)));
}

TEST(GgufHalf, RoundsToNearestEven) {
  const float ulp = std::ldexp(1.0f, -10);              // spacing of halves in [1, 2)
  EXPECT_EQ(fp32_to_fp16(1.0f + ulp / 2), 0x3c00);      // tie, even stays
  EXPECT_EQ(fp32_to_fp16(1.0f + 3 * ulp / 2), 0x3c02);  // tie, odd rounds up
  EXPECT_EQ(fp32_to_fp16(1.0f + ulp * 0.51f), 0x3c01);
  EXPECT_EQ(fp32_to_fp16(65519.0f), 0x7bff);
  EXPECT_EQ(fp32_to_fp16(65520.0f), 0x7c00);  // rounds past the largest half
  EXPECT_EQ(fp32_to_fp16(1e10f), 0x7c00);
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.0f, -25)), 0x0000);  // tie to even (0)
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(fp32_to_fp16(std::ldexp(3.0f, -25)), 0x0002);  // tie 1.5 -> 2
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.0f, -30)), 0x0000);
  EXPECT_EQ(fp32_to_fp16(std::numeric_limits<float>::infinity()), 0x7c00);
  const uint16_t nan = fp32_to_fp16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7c00, 0x7c00);
  EXPECT_NE(nan & 0x03ff, 0);
}

TEST(GgufHalf, EveryHalfRoundTripsExactly) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = fp16_to_fp32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(fp16_to_fp32(fp32_to_fp16(f)))) << h;
    } else {
      ASSERT_EQ(fp32_to_fp16(f), h) << "half bits 0x" << std::hex << h;
    }
  }
}

TEST(GgufHalf, Bfloat16) {
  EXPECT_EQ(fp32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_fp32(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_fp32(0xc040), -3.0f);
  // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
  EXPECT_EQ(fp32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(fp32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_fp32(fp32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(fp32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
}

// ---- type table ---------------------------------------------------------------

TEST(GgufTypes, TraitsMatchGgml) {
  struct Row {
    TensorType type;
    const char* name;
    int64_t elems, bytes;
  };
  const Row rows[] = {
      {TensorType::F32, "F32", 1, 4},       {TensorType::F16, "F16", 1, 2},
      {TensorType::BF16, "BF16", 1, 2},     {TensorType::Q4_0, "Q4_0", 32, 18},
      {TensorType::Q4_1, "Q4_1", 32, 20},   {TensorType::Q5_0, "Q5_0", 32, 22},
      {TensorType::Q5_1, "Q5_1", 32, 24},   {TensorType::Q8_0, "Q8_0", 32, 34},
      {TensorType::Q8_1, "Q8_1", 32, 36},   {TensorType::Q2_K, "Q2_K", 256, 84},
      {TensorType::Q3_K, "Q3_K", 256, 110}, {TensorType::Q4_K, "Q4_K", 256, 144},
      {TensorType::Q5_K, "Q5_K", 256, 176}, {TensorType::Q6_K, "Q6_K", 256, 210},
      {TensorType::Q8_K, "Q8_K", 256, 292},
  };
  for (const Row& r : rows) {
    const auto t = type_traits(static_cast<uint32_t>(r.type));
    ASSERT_TRUE(t.has_value()) << r.name;
    EXPECT_EQ(t->name, r.name);
    EXPECT_EQ(type_name(r.type), r.name);
    EXPECT_EQ(t->block_elems, r.elems) << r.name;
    EXPECT_EQ(t->block_bytes, r.bytes) << r.name;
    EXPECT_EQ(type_bytes(r.type, r.elems * 3), static_cast<uint64_t>(r.bytes * 3)) << r.name;
  }
  EXPECT_FALSE(type_traits(4).has_value());  // removed Q4_2
  EXPECT_FALSE(type_traits(99).has_value());
  EXPECT_FALSE(type_traits(16).has_value());  // IQ types: not known to us
  EXPECT_TRUE(type_traits(static_cast<uint32_t>(TensorType::Q4_1))->supported);
  EXPECT_FALSE(type_traits(static_cast<uint32_t>(TensorType::Q8_K))->supported);
}

// ---- dequantization of hand-built blocks ---------------------------------------

TEST(GgufDequantize, F32F16Bf16) {
  const float f32[3] = {1.5f, -2.25f, 1e-20f};
  float out[3];
  ASSERT_TRUE(dequantize(TensorType::F32, f32, out, 3).ok());
  EXPECT_EQ(std::vector<float>(out, out + 3), std::vector<float>(f32, f32 + 3));

  const uint16_t f16[4] = {0x3c00, 0xc000, 0x0001, 0x7bff};
  ASSERT_TRUE(dequantize(TensorType::F16, f16, out, 3).ok());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], std::ldexp(1.0f, -24));

  const uint16_t bf16[3] = {0x3f80, 0xc040, 0x4120};
  ASSERT_TRUE(dequantize(TensorType::BF16, bf16, out, 3).ok());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -3.0f);
  EXPECT_EQ(out[2], 10.0f);
}

TEST(GgufDequantize, Q8_0) {
  std::vector<uint8_t> block(34);
  put_half(block, 0, 0.5f);
  for (int j = 0; j < 32; ++j)
    block[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(j * 8 - 128));
  const auto y = dequantize_block(TensorType::Q8_0, block);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], (j * 8 - 128) * 0.5f) << j;
}

TEST(GgufDequantize, Q4_0LowNibblesFirst) {
  std::vector<uint8_t> block(18);
  put_half(block, 0, 2.0f);
  for (int j = 0; j < 16; ++j) block[2 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  const auto y = dequantize_block(TensorType::Q4_0, block);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], (j - 8) * 2.0f) << j;
    EXPECT_EQ(y[j + 16], (15 - j - 8) * 2.0f) << j + 16;
  }
}

TEST(GgufDequantize, Q4_1) {
  std::vector<uint8_t> block(20);
  put_half(block, 0, 0.5f);
  put_half(block, 2, -1.0f);
  for (int j = 0; j < 16; ++j) block[4 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  const auto y = dequantize_block(TensorType::Q4_1, block);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], j * 0.5f - 1.0f) << j;
    EXPECT_EQ(y[j + 16], (15 - j) * 0.5f - 1.0f) << j + 16;
  }
}

// Q5_0/Q5_1: element e has its low nibble in qs[e % 16] (low half for e < 16) and
// its fifth bit in bit e of the 32-bit qh.
std::vector<uint8_t> pack_q5(size_t header, const std::vector<int>& q) {
  std::vector<uint8_t> block(header + 4 + 16);
  uint32_t qh = 0;
  for (int e = 0; e < 32; ++e) {
    block[header + 4 + e % 16] |= static_cast<uint8_t>((q[e] & 0x0f) << (e < 16 ? 0 : 4));
    qh |= static_cast<uint32_t>((q[e] >> 4) & 1) << e;
  }
  std::memcpy(block.data() + header, &qh, 4);
  return block;
}

TEST(GgufDequantize, Q5_0AndQ5_1) {
  std::vector<int> q(32);
  for (int e = 0; e < 32; ++e) q[e] = (e * 13 + 5) % 32;
  auto b0 = pack_q5(2, q);
  put_half(b0, 0, 0.25f);
  auto y = dequantize_block(TensorType::Q5_0, b0);
  for (int e = 0; e < 32; ++e) EXPECT_EQ(y[e], (q[e] - 16) * 0.25f) << e;

  auto b1 = pack_q5(4, q);
  put_half(b1, 0, 0.25f);
  put_half(b1, 2, 3.0f);
  y = dequantize_block(TensorType::Q5_1, b1);
  for (int e = 0; e < 32; ++e) EXPECT_EQ(y[e], q[e] * 0.25f + 3.0f) << e;
}

// Q4_K/Q5_K pack eight 6-bit scales and mins into 12 bytes: entries 0..3 in the
// low 6 bits of bytes 0..3 (scales) and 4..7 (mins); entries 4..7 keep their low
// nibbles in bytes 8..11 (scale low, min high) and their top 2 bits in the top
// bits of bytes 0..3 (scales) and 4..7 (mins).
std::vector<uint8_t> pack_k_scales(const int sc[8], const int mn[8]) {
  std::vector<uint8_t> s(12);
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4));
  }
  return s;
}

TEST(GgufDequantize, Q4_K) {
  const int sc[8] = {1, 2, 3, 4, 44, 45, 46, 63};
  const int mn[8] = {0, 1, 2, 3, 54, 55, 56, 17};
  std::vector<uint8_t> block(144);
  put_half(block, 0, 0.5f);
  put_half(block, 2, 0.25f);
  const auto scales = pack_k_scales(sc, mn);
  std::copy(scales.begin(), scales.end(), block.begin() + 4);
  // Element e: sub-block s = e / 32 lives in bytes 32*(s/2).. (low nibble if s even).
  auto q_of = [](int e) { return (e * 5 + e / 32) % 16; };
  for (int e = 0; e < 256; ++e) {
    const int s = e / 32, l = e % 32;
    block[16 + 32 * (s / 2) + l] |= static_cast<uint8_t>(q_of(e) << (s % 2 ? 4 : 0));
  }
  const auto y = dequantize_block(TensorType::Q4_K, block);
  for (int e = 0; e < 256; ++e) {
    const int s = e / 32;
    EXPECT_FLOAT_EQ(y[e], 0.5f * sc[s] * q_of(e) - 0.25f * mn[s]) << e;
  }
}

TEST(GgufDequantize, Q5_K) {
  const int sc[8] = {9, 2, 33, 4, 44, 1, 46, 63};
  const int mn[8] = {5, 1, 2, 60, 54, 0, 56, 17};
  std::vector<uint8_t> block(176);
  put_half(block, 0, 0.125f);
  put_half(block, 2, 0.5f);
  const auto scales = pack_k_scales(sc, mn);
  std::copy(scales.begin(), scales.end(), block.begin() + 4);
  auto q_of = [](int e) { return (e * 7 + e / 32 * 5 + 3) % 32; };
  for (int e = 0; e < 256; ++e) {
    const int s = e / 32, l = e % 32;
    block[48 + 32 * (s / 2) + l] |= static_cast<uint8_t>((q_of(e) & 0x0f) << (s % 2 ? 4 : 0));
    block[16 + l] |= static_cast<uint8_t>(((q_of(e) >> 4) & 1) << s);  // fifth bit: bit s
  }
  const auto y = dequantize_block(TensorType::Q5_K, block);
  for (int e = 0; e < 256; ++e) {
    const int s = e / 32;
    EXPECT_FLOAT_EQ(y[e], 0.125f * sc[s] * q_of(e) - 0.5f * mn[s]) << e;
  }
}

// Q6_K: element e sits in half h = e/128, quarter t = (e%128)/32, lane l = e%32.
// Low 4 bits: ql[64h + l + 32(t%2)], low nibble for t < 2; high 2 bits: qh[32h + l]
// at bit 2t; scale index 8h + 2t + l/16; value d * scale * (q - 32).
TEST(GgufDequantize, Q6_K) {
  std::vector<uint8_t> block(210);
  int8_t sc[16];
  for (int i = 0; i < 16; ++i) sc[i] = static_cast<int8_t>(i * 9 - 70);
  std::memcpy(block.data() + 192, sc, 16);
  put_half(block, 208, 0.25f);
  auto q_of = [](int e) { return (e * 7 + e / 64) % 64; };
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, t = (e % 128) / 32, l = e % 32, q = q_of(e);
    block[64 * h + l + 32 * (t % 2)] |= static_cast<uint8_t>((q & 0x0f) << (t < 2 ? 0 : 4));
    block[128 + 32 * h + l] |= static_cast<uint8_t>((q >> 4) << (2 * t));
  }
  const auto y = dequantize_block(TensorType::Q6_K, block);
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, t = (e % 128) / 32, l = e % 32;
    EXPECT_FLOAT_EQ(y[e], 0.25f * sc[8 * h + 2 * t + l / 16] * (q_of(e) - 32)) << e;
  }
}

// Q2_K and Q3_K share the 2-bit layout: element e in half h = e/128, shift slot
// j = (e%128)/32, part p = (e%32)/16, lane l = e%16 reads qs[32h + 16p + l] at bit
// 2j; its scale index is 8h + 2j + p.
TEST(GgufDequantize, Q2_K) {
  std::vector<uint8_t> block(84);
  for (int i = 0; i < 16; ++i) block[i] = static_cast<uint8_t>((i % 16) | (((15 - i) % 16) << 4));
  put_half(block, 80, 0.5f);
  put_half(block, 82, 0.125f);
  auto q_of = [](int e) { return (e * 3 + e / 16) % 4; };
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, j = (e % 128) / 32, p = (e % 32) / 16, l = e % 16;
    block[16 + 32 * h + 16 * p + l] |= static_cast<uint8_t>(q_of(e) << (2 * j));
  }
  const auto y = dequantize_block(TensorType::Q2_K, block);
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, j = (e % 128) / 32, p = (e % 32) / 16;
    const int is = 8 * h + 2 * j + p;
    EXPECT_FLOAT_EQ(y[e], 0.5f * (block[is] & 0x0f) * q_of(e) - 0.125f * (block[is] >> 4)) << e;
  }
}

// Q3_K adds a high bit per element (hmask[16p + l], bit 4h + j; a clear bit
// subtracts 4) and sixteen 6-bit scales offset by 32: low nibbles in bytes 0..7
// (scales 0..7 low halves, 8..15 high halves), top 2 bits in bytes 8..11.
TEST(GgufDequantize, Q3_K) {
  std::vector<uint8_t> block(110);
  int scales[16];
  for (int i = 0; i < 16; ++i) scales[i] = (i * 11 + 3) % 64;
  for (int i = 0; i < 16; ++i) {
    block[96 + i % 8] |= static_cast<uint8_t>((scales[i] & 0x0f) << (i < 8 ? 0 : 4));
    block[96 + 8 + i % 4] |= static_cast<uint8_t>((scales[i] >> 4) << (2 * (i / 4)));
  }
  put_half(block, 108, 0.5f);
  auto q_of = [](int e) { return (e * 5 + e / 16) % 8; };  // 3-bit value 0..7
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, j = (e % 128) / 32, p = (e % 32) / 16, l = e % 16;
    block[32 + 32 * h + 16 * p + l] |= static_cast<uint8_t>((q_of(e) & 3) << (2 * j));
    if (q_of(e) & 4) block[16 * p + l] |= static_cast<uint8_t>(1 << (4 * h + j));
  }
  const auto y = dequantize_block(TensorType::Q3_K, block);
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, j = (e % 128) / 32, p = (e % 32) / 16;
    EXPECT_FLOAT_EQ(y[e], 0.5f * (scales[8 * h + 2 * j + p] - 32) * (q_of(e) - 4)) << e;
  }
}

TEST(GgufDequantize, ManyBlocksMatchBlockByBlock) {
  // Large enough to take the parallel path; every block must match its single decode.
  const int64_t n_blocks = 5000;
  std::vector<uint8_t> data(static_cast<size_t>(n_blocks) * 20);
  std::mt19937 rng(7);
  for (auto& byte : data) byte = static_cast<uint8_t>(rng());
  for (int64_t b = 0; b < n_blocks; ++b) {
    put_half(data, static_cast<size_t>(b) * 20, 0.01f * static_cast<float>(b % 97));
    put_half(data, static_cast<size_t>(b) * 20 + 2, -0.5f);
  }
  std::vector<float> all(static_cast<size_t>(n_blocks) * 32);
  ASSERT_TRUE(dequantize(TensorType::Q4_1, data.data(), all.data(), n_blocks * 32).ok());
  for (int64_t b = 0; b < n_blocks; b += 499) {
    std::vector<uint8_t> block(data.begin() + b * 20, data.begin() + (b + 1) * 20);
    const auto y = dequantize_block(TensorType::Q4_1, block);
    for (int j = 0; j < 32; ++j) ASSERT_EQ(all[static_cast<size_t>(b * 32 + j)], y[j]);
  }
}

TEST(GgufDequantize, Errors) {
  std::vector<uint8_t> block(292);
  std::vector<float> out(256);
  Status s = dequantize(TensorType::Q8_K, block.data(), out.data(), 256);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("unsupported tensor type Q8_K"), std::string::npos) << s.message();
  s = dequantize(TensorType::Q8_0, block.data(), out.data(), 33);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("Q8_0"), std::string::npos) << s.message();
  s = dequantize(static_cast<TensorType>(99), block.data(), out.data(), 1);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("99"), std::string::npos) << s.message();
}

// ---- quantization -------------------------------------------------------------

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = normal(rng) * (1.0f + static_cast<float>(i / 32 % 7));
  return v;
}

std::vector<float> round_trip(TensorType type, const std::vector<float>& x) {
  const auto n = static_cast<int64_t>(x.size());
  auto q = quantize(type, x.data(), n);
  EXPECT_TRUE(q.ok()) << q.message();
  EXPECT_EQ(q->size(), type_bytes(type, n));
  std::vector<float> y(x.size());
  EXPECT_TRUE(dequantize(type, q->data(), y.data(), n).ok());
  return y;
}

TEST(GgufQuantize, PlainFloatErrorBounds) {
  const auto x = random_floats(4096, 1);
  EXPECT_EQ(round_trip(TensorType::F32, x), x);
  const auto h = round_trip(TensorType::F16, x);
  const auto b = round_trip(TensorType::BF16, x);
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_LE(std::fabs(h[i] - x[i]), std::fabs(x[i]) * std::ldexp(1.0f, -11)) << i;
    EXPECT_LE(std::fabs(b[i] - x[i]), std::fabs(x[i]) * std::ldexp(1.0f, -8)) << i;
  }
}

// Bounds per 32-element block: half a step, plus the fp16 rounding of the stored
// scale (relative 2^-11, times at most 16 or 128 steps), with a little slack.
TEST(GgufQuantize, BlockErrorBounds) {
  const auto x = random_floats(32 * 256, 2);
  const auto q8 = round_trip(TensorType::Q8_0, x);
  const auto q40 = round_trip(TensorType::Q4_0, x);
  const auto q41 = round_trip(TensorType::Q4_1, x);
  for (size_t b = 0; b < x.size() / 32; ++b) {
    float amax = 0, lo = x[b * 32], hi = x[b * 32];
    for (size_t j = b * 32; j < b * 32 + 32; ++j) {
      amax = std::max(amax, std::fabs(x[j]));
      lo = std::min(lo, x[j]);
      hi = std::max(hi, x[j]);
    }
    const float d8 = amax / 127, d40 = amax / 8, d41 = (hi - lo) / 15;
    for (size_t j = b * 32; j < b * 32 + 32; ++j) {
      EXPECT_LE(std::fabs(q8[j] - x[j]), 0.5f * d8 + amax * 1e-3f) << j;
      // Q4_0 maps the extreme to -8, so the opposite extreme clamps at +7: one step.
      EXPECT_LE(std::fabs(q40[j] - x[j]), d40 * 1.01f) << j;
      EXPECT_LE(std::fabs(q41[j] - x[j]), 0.5f * d41 + (hi - lo + std::fabs(lo)) * 1e-3f) << j;
    }
  }
}

TEST(GgufQuantize, ExactGridsAndZeros) {
  std::vector<float> grid(32), zeros(32, 0.0f), q8(32);
  for (int j = 0; j < 32; ++j) grid[j] = (j % 16) * 0.5f - 1.0f;  // Q4_1: d 0.5, m -1
  EXPECT_EQ(round_trip(TensorType::Q4_1, grid), grid);
  for (int j = 0; j < 32; ++j) q8[j] = static_cast<float>(j * 8 - 127);  // d = 1
  q8[31] = 127.0f;
  EXPECT_EQ(round_trip(TensorType::Q8_0, q8), q8);
  EXPECT_EQ(round_trip(TensorType::Q8_0, zeros), zeros);
  EXPECT_EQ(round_trip(TensorType::Q4_0, zeros), zeros);
  EXPECT_EQ(round_trip(TensorType::Q4_1, zeros), zeros);
}

TEST(GgufQuantize, Errors) {
  std::vector<float> x(256, 1.0f);
  auto r = quantize(TensorType::Q4_K, x.data(), 256);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("Q4_K"), std::string::npos) << r.message();
  r = quantize(TensorType::Q8_0, x.data(), 40);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("40"), std::string::npos) << r.message();
  x[5] = std::numeric_limits<float>::quiet_NaN();
  r = quantize(TensorType::Q4_0, x.data(), 32);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("element 5"), std::string::npos) << r.message();
  EXPECT_TRUE(quantize(TensorType::F16, x.data(), 32).ok());  // NaN is a valid half
}

// ---- writer + reader round trips -----------------------------------------------

TEST(GgufRoundTrip, MetadataAndTensorsOfEveryType) {
  Writer w;
  w.set_u32("a.u32", 4000000000u);
  w.set_i32("a.i32", -123456);
  w.set_u64("a.u64", 1ull << 40);
  w.set_f32("a.f32", 0.1f);
  w.set_bool("a.true", true);
  w.set_bool("a.false", false);
  w.set_string("a.string", "hello, world");
  w.set_string("a.empty", "");
  w.set_string_array("a.strings", {"a", "", "ĠHello", std::string("nul\0byte", 8)});
  w.set_i32_array("a.ints", {1, -2, 2147483647});
  w.set_f32_array("a.floats", {0.5f, -1e-6f});
  w.set_i32_array("a.empty_ints", {});
  w.set_string("a.replaced", "old");
  w.set_string("a.replaced", "new");

  const auto x = random_floats(64 * 3, 3);
  const TensorType types[] = {TensorType::F32,  TensorType::F16,  TensorType::BF16,
                              TensorType::Q8_0, TensorType::Q4_0, TensorType::Q4_1};
  for (TensorType t : types) {
    ASSERT_TRUE(w.add_tensor_f32("t." + std::string(type_name(t)), t, {64, 3}, x).ok());
  }
  // Types we cannot quantize go in as raw bytes.
  std::vector<std::pair<TensorType, std::vector<uint8_t>>> raw;
  for (TensorType t : {TensorType::Q5_0, TensorType::Q5_1, TensorType::Q2_K, TensorType::Q3_K,
                       TensorType::Q4_K, TensorType::Q5_K, TensorType::Q6_K, TensorType::Q8_K}) {
    std::vector<uint8_t> bytes(type_bytes(t, 512));
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(i * 31 + 7);
    ASSERT_TRUE(w.add_tensor("r." + std::string(type_name(t)), t, {256, 2}, bytes).ok());
    raw.emplace_back(t, bytes);
  }
  TempFile file;
  ASSERT_TRUE(w.write(file.path()).ok());

  auto opened = File::open(file.path());
  ASSERT_TRUE(opened.ok()) << opened.message();
  // The same bytes from memory parse to the same file; cut short, the error names them.
  std::ifstream in(file.path(), std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto in_memory = File::from_bytes(bytes, "memory.gguf");
  ASSERT_TRUE(in_memory.ok()) << in_memory.message();
  EXPECT_EQ((*in_memory)->metadata().size(), (*opened)->metadata().size());
  ASSERT_EQ((*in_memory)->tensors().size(), (*opened)->tensors().size());
  for (size_t i = 0; i < (*opened)->tensors().size(); ++i) {
    const TensorInfo& a = (*opened)->tensors()[i];
    const TensorInfo& b = (*in_memory)->tensors()[i];
    EXPECT_EQ(a.name, b.name);
    EXPECT_EQ(std::memcmp(a.data, b.data, a.n_bytes), 0) << a.name;
  }
  bytes.resize(bytes.size() / 2);
  auto cut = File::from_bytes(bytes, "memory.gguf");
  ASSERT_FALSE(cut.ok());
  EXPECT_NE(cut.message().find("memory.gguf"), std::string::npos) << cut.message();
  const File& f = **opened;
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.path(), file.path());
  EXPECT_EQ(f.file_size(), fs::file_size(file.path()));
  EXPECT_EQ(f.metadata().size(), 13u);
  EXPECT_EQ(f.get_int("a.u32"), 4000000000);
  EXPECT_EQ(f.get_int("a.i32"), -123456);
  EXPECT_EQ(f.get_int("a.u64"), int64_t{1} << 40);
  EXPECT_EQ(f.get_float("a.f32"), static_cast<double>(0.1f));
  EXPECT_EQ(f.get_float("a.i32"), -123456.0);  // integers convert to float
  EXPECT_EQ(f.get_bool("a.true"), true);
  EXPECT_EQ(f.get_bool("a.false"), false);
  EXPECT_EQ(f.get_string("a.string"), "hello, world");
  EXPECT_EQ(f.get_string("a.empty"), "");
  EXPECT_EQ(f.get_string("a.replaced"), "new");
  EXPECT_EQ(f.get_string_array("a.strings"),
            (std::vector<std::string>{"a", "", "ĠHello", std::string("nul\0byte", 8)}));
  EXPECT_EQ(f.get_int_array("a.ints"), (std::vector<int64_t>{1, -2, 2147483647}));
  EXPECT_EQ(f.get_float_array("a.floats"), (std::vector<double>{0.5, static_cast<double>(-1e-6f)}));
  EXPECT_EQ(f.get_float_array("a.ints"), (std::vector<double>{1, -2, 2147483647}));
  EXPECT_EQ(f.get_int_array("a.empty_ints"), std::vector<int64_t>{});
  const Value* v = f.find("a.ints");
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(v->type, ValueType::ARRAY);
  EXPECT_EQ(v->elem_type, ValueType::INT32);

  // Type mismatches are nullopt, not conversions.
  EXPECT_FALSE(f.get_int("a.string").has_value());
  EXPECT_FALSE(f.get_int("a.true").has_value());
  EXPECT_FALSE(f.get_int("a.f32").has_value());
  EXPECT_FALSE(f.get_bool("a.u32").has_value());
  EXPECT_FALSE(f.get_string("a.u32").has_value());
  EXPECT_FALSE(f.get_float("a.string").has_value());
  EXPECT_FALSE(f.get_string_array("a.ints").has_value());
  EXPECT_FALSE(f.get_int_array("a.strings").has_value());
  EXPECT_FALSE(f.get_int_array("a.floats").has_value());
  EXPECT_FALSE(f.get_float_array("a.strings").has_value());
  EXPECT_FALSE(f.get_string_array("a.string").has_value());
  EXPECT_FALSE(f.get_int("missing").has_value());
  EXPECT_EQ(f.find("missing"), nullptr);

  ASSERT_EQ(f.tensors().size(), 14u);
  EXPECT_EQ(f.tensors()[0].name, "t.F32");  // directory order is insertion order
  for (TensorType t : types) {
    const TensorInfo* info = f.find_tensor("t." + std::string(type_name(t)));
    ASSERT_NE(info, nullptr) << type_name(t);
    EXPECT_EQ(info->type, t);
    EXPECT_EQ(info->dims, (std::vector<int64_t>{64, 3}));
    EXPECT_EQ(info->n_elems(), 192);
    EXPECT_EQ(info->n_bytes, type_bytes(t, 192));
    EXPECT_EQ(info->offset % 32, 0u);
    EXPECT_EQ((info->data - f.bytes()) % 32, 0);
    auto y = dequantize(*info);
    ASSERT_TRUE(y.ok()) << y.message();
    EXPECT_EQ(*y, round_trip(t, x)) << type_name(t);  // same bytes as quantize gives
  }
  for (const auto& [t, bytes] : raw) {
    const TensorInfo* info = f.find_tensor("r." + std::string(type_name(t)));
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->type, t);
    ASSERT_EQ(info->n_bytes, bytes.size());
    EXPECT_EQ(std::memcmp(info->data, bytes.data(), bytes.size()), 0) << type_name(t);
  }
  EXPECT_EQ(f.find_tensor("nope"), nullptr);
  auto q8k = dequantize(*f.find_tensor("r.Q8_K"));  // known type: opens, cannot decode
  ASSERT_FALSE(q8k.ok());
  EXPECT_NE(q8k.message().find("r.Q8_K"), std::string::npos) << q8k.message();
  EXPECT_NE(q8k.message().find("unsupported tensor type Q8_K"), std::string::npos);
}

TEST(GgufRoundTrip, CustomAlignment) {
  Writer w;
  w.set_alignment(64);
  ASSERT_TRUE(w.add_tensor_f32("a", TensorType::F32, {3}, {1, 2, 3}).ok());
  ASSERT_TRUE(w.add_tensor_f32("b", TensorType::F32, {5}, {4, 5, 6, 7, 8}).ok());
  TempFile file;
  ASSERT_TRUE(w.write(file.path()).ok());
  auto f = File::open(file.path());
  ASSERT_TRUE(f.ok()) << f.message();
  EXPECT_EQ((*f)->alignment(), 64u);
  EXPECT_EQ((*f)->get_int("general.alignment"), 64);
  const TensorInfo* b = (*f)->find_tensor("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->offset, 64u);
  EXPECT_EQ((b->data - (*f)->bytes()) % 64, 0);
  EXPECT_EQ(*dequantize(*b), (std::vector<float>{4, 5, 6, 7, 8}));

  // general.alignment set as a plain key is honored by the writer too.
  Writer plain;
  plain.set_u32("general.alignment", 128);
  ASSERT_TRUE(plain.add_tensor_f32("a", TensorType::F32, {3}, {1, 2, 3}).ok());
  ASSERT_TRUE(plain.add_tensor_f32("b", TensorType::F32, {1}, {9}).ok());
  ASSERT_TRUE(plain.write(file.path()).ok());
  auto g = File::open(file.path());
  ASSERT_TRUE(g.ok()) << g.message();
  EXPECT_EQ((*g)->alignment(), 128u);
  EXPECT_EQ((*g)->find_tensor("b")->offset, 128u);
  EXPECT_EQ(*dequantize(*(*g)->find_tensor("b")), std::vector<float>{9});
}

TEST(GgufRoundTrip, Version2) {
  Writer w;
  w.set_string("general.name", "v2");
  ASSERT_TRUE(w.add_tensor_f32("w", TensorType::Q8_0, {32}, random_floats(32, 4)).ok());
  TempFile file;
  ASSERT_TRUE(w.write(file.path()).ok());
  auto bytes = read_bytes(file.path());
  ASSERT_EQ(bytes[4], 3);
  bytes[4] = 2;  // v2 and v3 share the layout (v3 only added big-endian files)
  write_bytes(file.path(), bytes);
  auto f = File::open(file.path());
  ASSERT_TRUE(f.ok()) << f.message();
  EXPECT_EQ((*f)->version(), 2u);
  EXPECT_EQ((*f)->get_string("general.name"), "v2");
  EXPECT_EQ(*dequantize(*(*f)->find_tensor("w")),
            round_trip(TensorType::Q8_0, random_floats(32, 4)));
}

// Every value type, including those the Writer does not expose, and nested arrays.
TEST(GgufRoundTrip, EveryValueTypeFromRawBytes) {
  RawGguf raw;
  raw.header(0, 15);
  raw.key("u8", ValueType::UINT8).u8(200);
  raw.key("i8", ValueType::INT8).put<int8_t>(-100);
  raw.key("u16", ValueType::UINT16).put<uint16_t>(60000);
  raw.key("i16", ValueType::INT16).put<int16_t>(-30000);
  raw.key("u32", ValueType::UINT32).u32(7);
  raw.key("i32", ValueType::INT32).put<int32_t>(-7);
  raw.key("f32", ValueType::FLOAT32).put<float>(2.5f);
  raw.key("bool", ValueType::BOOL).u8(1);
  raw.key("str", ValueType::STRING).str("text");
  raw.key("u64", ValueType::UINT64).u64(std::numeric_limits<uint64_t>::max());
  raw.key("i64", ValueType::INT64).put<int64_t>(std::numeric_limits<int64_t>::min());
  raw.key("f64", ValueType::FLOAT64).put<double>(1e300);
  raw.key("u16s", ValueType::ARRAY).u32(static_cast<uint32_t>(ValueType::UINT16)).u64(2);
  raw.put<uint16_t>(1).put<uint16_t>(65535);
  raw.key("f64s", ValueType::ARRAY).u32(static_cast<uint32_t>(ValueType::FLOAT64)).u64(1);
  raw.put<double>(-0.25);
  // [[1, 2], []] as arrays of UINT8.
  raw.key("nested", ValueType::ARRAY).u32(static_cast<uint32_t>(ValueType::ARRAY)).u64(2);
  raw.u32(static_cast<uint32_t>(ValueType::UINT8)).u64(2).u8(1).u8(2);
  raw.u32(static_cast<uint32_t>(ValueType::UINT8)).u64(0);
  TempFile file;
  write_bytes(file.path(), raw.b);
  auto opened = File::open(file.path());
  ASSERT_TRUE(opened.ok()) << opened.message();
  const File& f = **opened;
  EXPECT_EQ(f.get_int("u8"), 200);
  EXPECT_EQ(f.get_int("i8"), -100);
  EXPECT_EQ(f.get_int("u16"), 60000);
  EXPECT_EQ(f.get_int("i16"), -30000);
  EXPECT_EQ(f.get_int("u32"), 7);
  EXPECT_EQ(f.get_int("i32"), -7);
  EXPECT_EQ(f.get_float("f32"), 2.5);
  EXPECT_EQ(f.get_bool("bool"), true);
  EXPECT_EQ(f.get_string("str"), "text");
  EXPECT_FALSE(f.get_int("u64").has_value());  // does not fit int64
  EXPECT_EQ(std::get<uint64_t>(f.find("u64")->scalar), std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(f.get_int("i64"), std::numeric_limits<int64_t>::min());
  EXPECT_EQ(f.get_float("f64"), 1e300);
  EXPECT_EQ(f.get_int_array("u16s"), (std::vector<int64_t>{1, 65535}));
  EXPECT_EQ(f.get_float_array("f64s"), std::vector<double>{-0.25});
  const Value* nested = f.find("nested");
  ASSERT_NE(nested, nullptr);
  EXPECT_EQ(nested->elem_type, ValueType::ARRAY);
  ASSERT_EQ(nested->array.size(), 2u);
  EXPECT_EQ(nested->array[0].elem_type, ValueType::UINT8);
  ASSERT_EQ(nested->array[0].array.size(), 2u);
  EXPECT_EQ(std::get<uint64_t>(nested->array[0].array[1].scalar), 2u);
  EXPECT_TRUE(nested->array[1].array.empty());
  EXPECT_FALSE(f.get_int_array("nested").has_value());
  EXPECT_TRUE(f.tensors().empty());
}

TEST(GgufWriter, RejectsBadTensors) {
  Writer w;
  Status s = w.add_tensor("short", TensorType::F32, {4}, std::vector<uint8_t>(15));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("'short'"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("16"), std::string::npos) << s.message();
  EXPECT_FALSE(w.add_tensor("zero", TensorType::F32, {4, 0}, {}).ok());
  EXPECT_FALSE(w.add_tensor("neg", TensorType::F32, {-4}, {}).ok());
  EXPECT_FALSE(
      w.add_tensor("five", TensorType::F32, {1, 1, 1, 1, 1}, std::vector<uint8_t>(4)).ok());
  EXPECT_FALSE(w.add_tensor("none", TensorType::F32, {}, std::vector<uint8_t>(4)).ok());
  EXPECT_FALSE(w.add_tensor("block", TensorType::Q8_0, {16, 2}, std::vector<uint8_t>(34)).ok());
  EXPECT_FALSE(
      w.add_tensor("type", static_cast<TensorType>(99), {4}, std::vector<uint8_t>(4)).ok());
  EXPECT_FALSE(w.add_tensor_f32("count", TensorType::F32, {4}, {1, 2, 3}).ok());
  ASSERT_TRUE(w.add_tensor_f32("dup", TensorType::F32, {1}, {1}).ok());
  s = w.add_tensor_f32("dup", TensorType::F32, {1}, {1});
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("duplicate tensor name 'dup'"), std::string::npos) << s.message();
}

TEST(GgufWriter, RejectsBadAlignmentAndUnwritablePath) {
  TempFile file;
  Writer w;
  w.set_alignment(48);
  Status s = w.write(file.path());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("48"), std::string::npos) << s.message();
  Writer ok;
  const fs::path bad = file.path() / "no" / "such" / "dir.gguf";
  s = ok.write(bad);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.message().rfind(bad.string(), 0), 0u) << s.message();
}

// ---- reader errors -------------------------------------------------------------

TEST(GgufReaderErrors, MissingFileAndDirectory) {
  TempFile file;
  auto r = File::open(file.path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.message().rfind(file.str() + ": cannot open", 0), 0u) << r.message();
  r = File::open(test_dir());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("not a regular file"), std::string::npos) << r.message();
}

TEST(GgufReaderErrors, EmptyFile) { expect_open_error({}, {"empty file"}); }

TEST(GgufReaderErrors, BadMagic) {
  auto raw = one_f32_tensor_file();
  raw.b[3] = 'L';  // "GGUL"
  expect_open_error(raw.b, {"not a GGUF file", "bad magic"});
  expect_open_error({'G', 'G', 'M', 'L', 1, 0, 0, 0}, {"bad magic 0x47474d4c"});
  expect_open_error({'P', 'K'}, {"bad magic"});
  expect_open_error({'G', 'G'}, {"truncated", "header"});
}

TEST(GgufReaderErrors, UnsupportedVersions) {
  auto raw = one_f32_tensor_file();
  raw.b[4] = 1;
  expect_open_error(raw.b, {"version 1 is not supported"});
  raw.b[4] = 99;
  expect_open_error(raw.b, {"unsupported GGUF version 99"});
  raw.b[4] = 0;
  raw.b[7] = 3;  // version 3 written big-endian
  expect_open_error(raw.b, {"big-endian"});
}

// Every proper prefix of a valid file must be refused with a message, never crash.
TEST(GgufReaderErrors, TruncatedAtEveryByte) {
  Writer w;
  w.set_string("general.architecture", "llama");
  w.set_u32("llama.block_count", 2);
  w.set_string_array("tokenizer.ggml.tokens", {"<s>", "a", "bc"});
  w.set_f32_array("scores", {0.0f, -1.0f, -2.0f});
  ASSERT_TRUE(w.add_tensor_f32("a", TensorType::Q8_0, {32}, random_floats(32, 5)).ok());
  ASSERT_TRUE(w.add_tensor_f32("b", TensorType::F32, {8}, random_floats(8, 6)).ok());
  TempFile full;
  ASSERT_TRUE(w.write(full.path()).ok());
  const auto bytes = read_bytes(full.path());
  size_t data_end = 0;
  {
    auto f = File::open(full.path());
    ASSERT_TRUE(f.ok()) << f.message();
    const TensorInfo& last = (*f)->tensors().back();
    data_end = static_cast<size_t>(last.data - (*f)->bytes()) + last.n_bytes;
  }
  ASSERT_LE(data_end, bytes.size());
  // Shrink one copy from the end: one truncate() per length instead of a rewrite.
  TempFile cut;
  write_bytes(cut.path(), bytes);
  for (size_t n = bytes.size(); n-- > 0;) {
    ASSERT_EQ(::truncate(cut.str().c_str(), static_cast<off_t>(n)), 0);
    auto f = File::open(cut.path());
    if (n >= data_end) {  // only trailing padding is missing: still a complete file
      EXPECT_TRUE(f.ok()) << n << ": " << f.message();
      continue;
    }
    ASSERT_FALSE(f.ok()) << "prefix of " << n << " bytes opened";
    EXPECT_EQ(f.message().rfind(cut.str() + ": ", 0), 0u) << f.message();
    EXPECT_EQ(f.message().find('\n'), std::string::npos) << f.message();
    if (n >= 8) {
      EXPECT_TRUE(f.message().find("truncated") != std::string::npos ||
                  f.message().find("past the end") != std::string::npos ||
                  f.message().find("cannot fit") != std::string::npos ||
                  f.message().find("claims") != std::string::npos)
          << n << ": " << f.message();
    }
  }
}

// Random byte corruption of a valid file: every open either succeeds or returns a
// one-line error naming the file; none may crash (run under ASan to see overreads).
TEST(GgufReaderErrors, CorruptedBytesNeverCrash) {
  Writer w;
  w.set_string("general.architecture", "llama");
  w.set_string_array("tokenizer.ggml.tokens", {"<s>", "a", "bc"});
  w.set_i32_array("tokenizer.ggml.token_type", {3, 1, 1});
  ASSERT_TRUE(w.add_tensor_f32("a", TensorType::Q4_1, {32, 2}, random_floats(64, 8)).ok());
  ASSERT_TRUE(w.add_tensor_f32("b", TensorType::F16, {4}, random_floats(4, 9)).ok());
  TempFile file;
  ASSERT_TRUE(w.write(file.path()).ok());
  const auto original = read_bytes(file.path());
  std::mt19937 rng(1234);
  int opened = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    auto bytes = original;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      // Mostly the header and directory, where the structure is.
      const size_t at = rng() % std::min<size_t>(bytes.size(), rng() % 2 ? 256 : bytes.size());
      bytes[at] = static_cast<uint8_t>(rng() % 3 == 0 ? 0xff : rng());
    }
    const int fd = ::open(file.str().c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
    ::close(fd);
    auto f = File::open(file.path());
    if (f.ok()) {
      ++opened;
      for (const TensorInfo& t : (*f)->tensors()) (void)dequantize(t);
      continue;
    }
    ASSERT_EQ(f.message().rfind(file.str() + ": ", 0), 0u) << f.message();
    ASSERT_EQ(f.message().find('\n'), std::string::npos) << f.message();
  }
  EXPECT_GT(opened, 0);  // some flips land in data and leave the file valid
  EXPECT_LT(opened, 2000);
}

TEST(GgufReaderErrors, TruncatedDirectoryEntryNamesTheEntry) {
  RawGguf raw;
  raw.header(2, 0).tensor("first", {8}, 0, 0).str("blk.0.attn_q.weight").u32(2).u64(8);
  raw.zeros(4);  // half of the second dimension, then the file ends
  expect_open_error(raw.b, {"truncated", "tensor directory entry 1 ('blk.0.attn_q.weight')",
                            "ends at byte", "but the file has"});
}

TEST(GgufReaderErrors, UnknownValueType) {
  RawGguf raw;
  raw.header(0, 1).key("general.weird", static_cast<ValueType>(13)).u32(0);
  expect_open_error(raw.b, {"'general.weird'", "unknown value type id 13"});
  RawGguf arr;
  arr.header(0, 1).key("list", ValueType::ARRAY).u32(42).u64(0);
  expect_open_error(arr.b, {"'list'", "unknown element type id 42"});
}

TEST(GgufReaderErrors, StringLengthPastEnd) {
  RawGguf key;
  key.header(0, 1).u64(1000).zeros(20);  // key claims 1000 bytes
  expect_open_error(key.b, {"metadata entry 0", "string length 1000", "past the end"});
  RawGguf value;
  value.header(0, 1).key("general.name", ValueType::STRING).u64(~0ull).zeros(4);
  expect_open_error(value.b,
                    {"'general.name'", "string length 18446744073709551615", "past the end"});
  RawGguf element;
  element.header(0, 1).key("tokens", ValueType::ARRAY).u32(8).u64(2).str("ok").u64(50).zeros(3);
  expect_open_error(element.b, {"'tokens'", "element 1", "string length 50"});
}

TEST(GgufReaderErrors, AbsurdCounts) {
  RawGguf tensors;
  tensors.header(1ull << 40, 0).zeros(64);
  expect_open_error(tensors.b, {"claims 1099511627776 tensors"});
  RawGguf kvs;
  kvs.header(0, ~0ull).zeros(64);
  expect_open_error(kvs.b, {"claims 18446744073709551615 metadata entries"});
  RawGguf array;
  array.header(0, 1).key("big", ValueType::ARRAY).u32(static_cast<uint32_t>(ValueType::UINT32));
  array.u64(1ull << 61).zeros(64);
  expect_open_error(array.b, {"'big'", "array of 2305843009213693952 elements", "cannot fit"});
}

TEST(GgufReaderErrors, BadValues) {
  RawGguf boolean;
  boolean.header(0, 1).key("flag", ValueType::BOOL).u8(2);
  expect_open_error(boolean.b, {"'flag'", "bool byte is 2"});
  RawGguf deep;
  deep.header(0, 1).key("deep", ValueType::ARRAY);
  for (int i = 0; i < 9; ++i) deep.u32(static_cast<uint32_t>(ValueType::ARRAY)).u64(1);
  deep.u32(0).u64(0).zeros(16);
  expect_open_error(deep.b, {"'deep'", "nested more than 8 deep"});
  RawGguf dup;
  dup.header(0, 2).kv_u32("k", 1).kv_u32("k", 2);
  expect_open_error(dup.b, {"duplicate metadata key 'k' (entries 0 and 1)"});
}

TEST(GgufReaderErrors, BadAlignment) {
  for (uint32_t bad : {0u, 3u, 48u}) {
    RawGguf raw;
    raw.header(1, 1).kv_u32("general.alignment", bad).tensor("x", {8}, 0, 0).pad(64).zeros(64);
    expect_open_error(
        raw.b, {"general.alignment must be a nonzero power of two", "got " + std::to_string(bad)});
  }
  RawGguf str;
  str.header(0, 1).key("general.alignment", ValueType::STRING).str("32");
  expect_open_error(str.b, {"general.alignment", "non-integer"});
}

TEST(GgufReaderErrors, AlignmentIsHonored) {
  RawGguf raw;
  raw.header(1, 1).kv_u32("general.alignment", 8).tensor("x", {2}, 0, 8);
  raw.pad(8).zeros(8).put<float>(1.5f).put<float>(-2.0f);
  TempFile file;
  write_bytes(file.path(), raw.b);
  auto f = File::open(file.path());
  ASSERT_TRUE(f.ok()) << f.message();
  EXPECT_EQ((*f)->alignment(), 8u);
  EXPECT_EQ(*dequantize((*f)->tensors()[0]), (std::vector<float>{1.5f, -2.0f}));
}

TEST(GgufReaderErrors, UnknownTensorType) {
  RawGguf raw;
  raw.header(1, 0).tensor("blk.0.ffn_up.weight", {32}, 99, 0).pad().zeros(256);
  expect_open_error(raw.b, {"tensor 'blk.0.ffn_up.weight' has unknown type id 99"});
}

TEST(GgufReaderErrors, KnownButUnsupportedTypeOpens) {
  RawGguf raw;
  raw.header(1, 0).tensor("k", {256}, static_cast<uint32_t>(TensorType::Q8_K), 0).pad().zeros(320);
  TempFile file;
  write_bytes(file.path(), raw.b);
  auto f = File::open(file.path());
  ASSERT_TRUE(f.ok()) << f.message();
  auto y = dequantize((*f)->tensors()[0]);
  ASSERT_FALSE(y.ok());
  EXPECT_NE(y.message().find("unsupported tensor type Q8_K"), std::string::npos) << y.message();
}

TEST(GgufReaderErrors, TensorDataPastEnd) {
  RawGguf raw;
  raw.header(1, 0).tensor("w", {8, 4}, 0, 0).pad().zeros(100);  // needs 128 bytes
  expect_open_error(raw.b, {"truncated", "tensor 'w'", "128 bytes", "ends at byte"});
  RawGguf far;
  far.header(1, 0).tensor("w", {8}, 0, 1ull << 62).pad().zeros(32);
  expect_open_error(far.b, {"tensor 'w'", "ends at byte"});
  RawGguf wrap;  // offset + size wraps around 2^64
  wrap.header(1, 0).tensor("w", {8}, 0, ~0ull - 31).pad().zeros(32);
  expect_open_error(wrap.b, {"tensor 'w'", "beyond"});
}

TEST(GgufReaderErrors, MisalignedOffset) {
  RawGguf raw;
  raw.header(1, 0).tensor("w", {4}, 0, 16).pad().zeros(64);
  expect_open_error(raw.b, {"tensor 'w'", "offset 16", "alignment 32"});
}

TEST(GgufReaderErrors, DuplicateTensorName) {
  RawGguf raw;
  raw.header(2, 0).tensor("w", {8}, 0, 0).tensor("w", {8}, 0, 32).pad().zeros(64);
  expect_open_error(raw.b, {"duplicate tensor name 'w'", "entries 0 and 1"});
}

TEST(GgufReaderErrors, BadDimensions) {
  for (uint32_t n_dims : {0u, 5u}) {
    RawGguf raw;
    raw.header(1, 0).str("w").u32(n_dims);
    for (uint32_t i = 0; i < n_dims; ++i) raw.u64(1);
    raw.u32(0).u64(0).pad().zeros(64);
    expect_open_error(
        raw.b, {"tensor 'w'", "has " + std::to_string(n_dims) + " dimensions", "must be 1 to 4"});
  }
  RawGguf zero;
  zero.header(1, 0).tensor("w", {4, 0}, 0, 0).pad().zeros(64);
  expect_open_error(zero.b, {"tensor 'w'", "dimension 1 = 0"});
  RawGguf huge;
  huge.header(1, 0).tensor("w", {1ull << 32, 1ull << 32}, 0, 0).pad().zeros(64);
  expect_open_error(huge.b, {"tensor 'w'", "overflow"});
  RawGguf block;
  block.header(1, 0)
      .tensor("w", {16, 2}, static_cast<uint32_t>(TensorType::Q8_0), 0)
      .pad()
      .zeros(64);
  expect_open_error(block.b, {"tensor 'w'", "dims[0] = 16", "Q8_0 block size 32"});
}

TEST(GgufReaderErrors, HostileNamesStayOnOneLine) {
  RawGguf raw;
  raw.header(1, 0).tensor("evil\nname", {8}, 77, 0).pad().zeros(64);
  expect_open_error(raw.b, {"'evil\\x0aname'", "unknown type id 77"});
}

}  // namespace test_gguf
}  // namespace inferlab::gguf
