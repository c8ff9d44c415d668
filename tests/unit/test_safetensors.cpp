// safetensors reading (formats/safetensors.h): values of F32, F16 and BF16
// tensors and the metadata as written; every malformed header refused naming
// the file and the tensor.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "formats/safetensors.h"
#include "gguf/half.h"
#include "test_support.h"

namespace inferlab {
namespace test_safetensors {

// A file from a header text and data bytes.
std::vector<uint8_t> file_bytes(const std::string& header, const std::vector<uint8_t>& data) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char(uint8_t(n >> (8 * i)));
  out += header;
  out.append(data.begin(), data.end());
  return std::vector<uint8_t>(out.begin(), out.end());
}

void put(std::vector<uint8_t>& data, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  data.insert(data.end(), b, b + n);
}

TEST(Safetensors, ReadsEachDtypeAndTheMetadata) {
  std::vector<uint8_t> data;
  const float f32[] = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.5f};
  put(data, f32, sizeof f32);
  for (const float v : {0.5f, -1.0f, 65504.0f}) {
    const uint16_t h = fp32_to_fp16(v);
    put(data, &h, 2);
  }
  for (const float v : {2.0f, -3.0f}) {
    const uint16_t b = fp32_to_bf16(v);
    put(data, &b, 2);
  }
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("h":{"dtype":"F16","shape":[3],"data_offsets":[24,30]},"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[30,34]},)"
      R"("empty":{"dtype":"F32","shape":[0,4],"data_offsets":[34,34]}})";
  const auto path = test::temp_path("ok.safetensors");
  {
    const auto bytes = file_bytes(header, data);
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  }
  auto f = safetensors::File::open(path);
  ASSERT_TRUE(f.ok()) << f.message();
  EXPECT_EQ(f->tensors().size(), 4u);
  EXPECT_EQ(f->metadata().at("format"), "pt");
  const auto* a = f->find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f->read_f32(*a), std::vector<float>(std::begin(f32), std::end(f32)));
  EXPECT_EQ(f->read_f32(*f->find("h")), (std::vector<float>{0.5f, -1.0f, 65504.0f}));
  EXPECT_EQ(f->read_f32(*f->find("b")), (std::vector<float>{2.0f, -3.0f}));
  EXPECT_TRUE(f->read_f32(*f->find("empty")).empty());
  EXPECT_EQ(f->find("missing"), nullptr);
}

TEST(Safetensors, MalformedHeadersAreRefusedNamingFileAndTensor) {
  const std::vector<uint8_t> eight(8, 0);
  struct Case {
    std::vector<uint8_t> bytes;
    std::string want;
  };
  std::vector<uint8_t> past = file_bytes("{}", {});
  past[0] = 200;  // claims 200 header bytes
  const std::vector<Case> cases = {
      {{1, 2, 3}, "3 bytes: too short"},
      {past, "the header length 200 runs past the file's 10 bytes"},
      {file_bytes("{not json", {}), "the header is not JSON"},
      {file_bytes("[1,2]", {}), "the header is not a JSON object"},
      {file_bytes(R"({"w":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}})", {0, 0}),
       "tensor w: dtype I8 (this reader converts F32, F16 and BF16)"},
      {file_bytes(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight),
       "tensor w: 8 bytes for a F32 tensor of 3 values"},
      {file_bytes(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", eight),
       "tensor w: data_offsets [0, 16] outside the 8 data bytes"},
      {file_bytes(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", eight),
       "tensor w: a shape entry is not a size"},
      {file_bytes(R"({"w":{"dtype":"F32","shape":[2]}})", eight), "tensor w: no data_offsets"},
      {file_bytes(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", eight), "tensor w: no dtype"},
      {file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}})",
                  eight),
       "tensors a and b share bytes"},
      {file_bytes(R"({"__metadata__":{"n":1}})", {}), "__metadata__ n: not a string"},
  };
  for (const Case& c : cases) {
    auto f = safetensors::File::from_bytes(c.bytes, "adapter.safetensors");
    ASSERT_FALSE(f.ok()) << c.want;
    EXPECT_EQ(f.message().rfind("adapter.safetensors: ", 0), 0u) << f.message();
    EXPECT_NE(f.message().find(c.want), std::string::npos) << f.message();
  }
  auto missing = safetensors::File::open(test::temp_path("no-such.safetensors"));
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.message().find("no-such.safetensors: cannot open"), std::string::npos);
}

}  // namespace test_safetensors
}  // namespace inferlab
