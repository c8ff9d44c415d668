// 4-bit quantization bit for bit against bitsandbytes (its CPU path, through
// PyPI's bitsandbytes; tests/reference/make_bnb_4bit_fixture.py wrote
// tests/reference/bnb_4bit.json): NF4 and FP4, with and without double
// quantization, block sizes 64-256, on random normal tensors (one not a
// multiple of the block) and on rows of SmolLM2's blk.0.attn_q. The packed
// codes (nibble order included), the absmaxes (or their 8-bit codes, the
// nested absmaxes, the offset and the dynamic map) and the dequantized values
// must all be the same bits (the double quantization's offset, torch's
// float32 mean, within 4 units in the last place; from it on, every bit). Int4 has no
// reference: bitsandbytes 0.50.2 lists its table but cannot build it.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "cpu/quant4.h"

namespace inferlab {
namespace test_bnb_reference {

namespace kc = kernels::cpu;

const std::filesystem::path& fixture_path() {
  static const auto path = std::filesystem::path(__FILE__).parent_path() / "../reference/bnb_4bit.json";
  return path;
}

std::vector<uint8_t> unhex(const std::string& hex) {
  std::vector<uint8_t> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) out[i] = uint8_t(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  return out;
}

std::vector<float> floats(const std::string& hex) {
  const auto bytes = unhex(hex);
  std::vector<float> out(bytes.size() / 4);
  std::memcpy(out.data(), bytes.data(), out.size() * 4);
  return out;
}

// Byte-wise (float) equality, and where the first difference lies.
template <typename T>
::testing::AssertionResult same_bits(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << got.size() << " values, bitsandbytes has " << want.size();
  size_t differ = 0, first = got.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      if (differ++ == 0) first = i;
    }
  if (differ == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << differ << " of " << got.size() << " differ, first at " << first << ": "
                                       << +got[first] << " vs bitsandbytes " << +want[first];
}

TEST(BnbReference, FourBitQuantizationIsBitExact) {
  std::ifstream in(fixture_path());
  ASSERT_TRUE(in) << "missing fixture " << fixture_path();
  const auto fixture = nlohmann::json::parse(in);
  int cases = 0;
  for (const auto& c : fixture.at("cases")) {
    const std::string input_name = c.at("input"), quant = c.at("quant_type");
    const int32_t block = c.at("blocksize");
    const bool dq = c.at("double_quant");
    SCOPED_TRACE(input_name + " " + quant + " block " + std::to_string(block) + (dq ? " dq" : ""));
    const auto input = floats(fixture.at("inputs").at(input_name).at("data"));
    ASSERT_EQ(int64_t(input.size()), fixture.at("inputs").at(input_name).at("n").get<int64_t>());
    const auto format = quant == "fp4" ? kc::Quant4Format::FP4 : kc::Quant4Format::NF4;
    auto q = kc::quant4_quantize(input.data(), 1, int64_t(input.size()), format, block, dq);
    EXPECT_TRUE(same_bits(q.codes, unhex(c.at("codes")))) << "codes";
    if (!dq) {
      EXPECT_TRUE(same_bits(q.absmax, floats(c.at("absmax")))) << "absmax";
    } else {
      // bitsandbytes' offset is torch's mean, summed in float32; ours sums in
      // double (the correctly rounded mean): within a few units in the last
      // place (2 on attn_q). From its offset on, every bit is the same.
      const float offset = floats(c.at("offset"))[0];
      EXPECT_LE(std::fabs(q.absmax_offset - offset), 4 * (std::nextafter(offset, 2 * offset) - offset)) << "offset";
      const auto plain = kc::quant4_quantize(input.data(), 1, int64_t(input.size()), format, block, false);
      kc::quant4_double_quantize(q, plain.absmax, offset);
      EXPECT_TRUE(same_bits(q.absmax_codes, unhex(c.at("absmax_codes")))) << "absmax codes";
      EXPECT_TRUE(same_bits(q.absmax_scale, floats(c.at("nested_absmax")))) << "nested absmax";
      const auto map = kc::dynamic_map_signed();
      EXPECT_TRUE(same_bits(std::vector<float>(map.begin(), map.end()), floats(c.at("nested_code")))) << "dynamic map";
    }
    const auto head = floats(c.at("dequantized_head"));
    std::vector<float> back(input.size());
    kc::quant4_dequantize(q, back.data());
    back.resize(head.size());
    // Zero's sign aside: bitsandbytes' own CPU paths disagree on it (FP4's
    // code 8 is -0 in its scalar table, +0 in its AVX-512 one and ours).
    for (size_t i = 0; i < back.size(); ++i)
      if (back[i] == 0 && head[i] == 0) back[i] = head[i];
    EXPECT_TRUE(same_bits(back, head)) << "dequantized";
    ++cases;
  }
  EXPECT_GE(cases, 12);
}

}  // namespace test_bnb_reference
}  // namespace inferlab
