// Head checkpoints: bit-exact round trips, and damaged files refused with
// messages that name the file.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "inferlab/train.h"

namespace inferlab::train {
namespace checkpoint_test {

namespace fs = std::filesystem;

class TrainCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("inferlab_train_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  static std::string read(const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
  }
  static void write(const std::string& p, const std::string& bytes) {
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  // A saved head's file, and the message load gives after `damage` changes its bytes.
  template <typename F>
  std::string refused(const std::string& name, F damage) {
    const std::string p = path(name);
    EXPECT_TRUE(save(*LowRankHead::create({5, 3, 4, true, true}, 1), p));
    std::string bytes = read(p);
    damage(bytes);
    write(p, bytes);
    auto loaded = load(p);
    EXPECT_FALSE(loaded);
    if (loaded) return "";
    EXPECT_NE(loaded.message().find(p), std::string::npos) << loaded.message();
    return loaded.message();
  }

  fs::path dir_;
};

TEST_F(TrainCheckpoint, RoundTripsBitExactly) {
  for (const HeadOptions& o : {HeadOptions{7, 3, 5, true, true}, HeadOptions{7, 0, 5, false, false}}) {
    auto head = LowRankHead::create(o, 42);
    ASSERT_TRUE(head);
    ASSERT_TRUE(save(*head, path("head.bin")));
    auto loaded = load(path("head.bin"), o);
    ASSERT_TRUE(loaded) << loaded.message();
    EXPECT_EQ(loaded->options().rank, o.rank);
    EXPECT_EQ(loaded->options().relu, o.relu);
    EXPECT_EQ(loaded->options().bias, o.bias);
    EXPECT_EQ(loaded->w1(), head->w1());
    EXPECT_EQ(loaded->w2(), head->w2());
    EXPECT_EQ(loaded->b2(), head->b2());
    // 40-byte header, parameters, 8-byte checksum.
    const size_t floats = head->w1().size() + head->w2().size() + head->b2().size();
    EXPECT_EQ(fs::file_size(path("head.bin")), 40 + 4 * floats + 8);
    EXPECT_FALSE(fs::exists(path("head.bin.tmp")));
  }
}

TEST_F(TrainCheckpoint, RefusesACorruptByte) {
  const std::string m = refused("corrupt.bin", [](std::string& b) { b[50] ^= 0x10; });
  EXPECT_NE(m.find("checksum mismatch"), std::string::npos) << m;
}

TEST_F(TrainCheckpoint, RefusesATruncatedFile) {
  std::string m = refused("truncated.bin", [](std::string& b) { b.resize(b.size() - 5); });
  EXPECT_NE(m.find("truncated"), std::string::npos) << m;
  m = refused("stub.bin", [](std::string& b) { b.resize(20); });
  EXPECT_NE(m.find("truncated"), std::string::npos) << m;
}

TEST_F(TrainCheckpoint, RefusesAWrongMagicAndAnotherVersion) {
  std::string m = refused("magic.bin", [](std::string& b) { b[0] = 'X'; });
  EXPECT_NE(m.find("wrong magic"), std::string::npos) << m;
  m = refused("version.bin", [](std::string& b) { b[8] = 2; });
  EXPECT_NE(m.find("format version 2"), std::string::npos) << m;
}

TEST_F(TrainCheckpoint, RefusesACorruptShapeWithoutAllocatingIt) {
  const std::string m = refused("shape.bin", [](std::string& b) { b[39] = 0x7f; });  // out's top byte
  EXPECT_NE(m.find("need"), std::string::npos) << m;
}

TEST_F(TrainCheckpoint, RefusesAShapeOtherThanExpected) {
  const std::string p = path("head.bin");
  ASSERT_TRUE(save(*LowRankHead::create({5, 3, 4, true, true}, 1), p));
  auto loaded = load(p, HeadOptions{5, 2, 4, true, true});
  ASSERT_FALSE(loaded);
  EXPECT_NE(loaded.message().find(p), std::string::npos) << loaded.message();
  EXPECT_NE(loaded.message().find("shape mismatch"), std::string::npos) << loaded.message();
}

TEST_F(TrainCheckpoint, RefusesAMissingFile) {
  auto loaded = load(path("absent.bin"));
  ASSERT_FALSE(loaded);
  EXPECT_NE(loaded.message().find(path("absent.bin")), std::string::npos) << loaded.message();
  EXPECT_NE(loaded.message().find("cannot open"), std::string::npos) << loaded.message();
}

}  // namespace checkpoint_test
}  // namespace inferlab::train
