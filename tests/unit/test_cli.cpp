// The inferlab executable: every bad input exits non-zero with one clear line.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "test_support.h"

namespace inferlab {
namespace {

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

CommandResult run_cli(const std::string& args) {
  const std::string command = std::string(INFERLAB_CLI_PATH) + " " + args + " 2>&1";
  CommandResult result;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buffer{};
  size_t n = 0;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) result.output.append(buffer.data(), n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

int count_lines(const std::string& s) { return int(std::count(s.begin(), s.end(), '\n')); }

std::filesystem::path tiny_model() {
  static const std::filesystem::path path = [] {
    auto p = test::temp_path("cli-tiny.gguf");
    SyntheticModelSpec spec;
    spec.name = "cli-tiny";
    EXPECT_TRUE(write_synthetic_model(spec, p).ok());
    return p;
  }();
  return path;
}

TEST(Cli, MissingModelFileIsOneLine) {
  auto r = run_cli("model info /nonexistent/model.gguf");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(count_lines(r.output), 1) << r.output;
  EXPECT_NE(r.output.find("/nonexistent/model.gguf"), std::string::npos) << r.output;
}

TEST(Cli, CorruptModelFileNamesTheFile) {
  auto path = test::temp_path("corrupt.gguf");
  std::ofstream(path) << "GGUF this is not a model";
  auto r = run_cli("generate --model " + path.string() + " --prompt hi");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(count_lines(r.output), 1) << r.output;
  EXPECT_NE(r.output.find(path.string()), std::string::npos) << r.output;
}

TEST(Cli, BadFlagValuesAreRejected) {
  for (const std::string args : {"generate --model x --prompt hi --max-tokens -3",
                                 "generate --model x --prompt hi --top-p 2",
                                 "perplexity --model x --text y --ctx 1", "generate --prompt", "frobnicate",
                                 "logits --model x --tokens 1,a,3"}) {
    auto r = run_cli(args);
    EXPECT_NE(r.exit_code, 0) << args;
    EXPECT_GE(count_lines(r.output), 1) << args;
    EXPECT_LE(count_lines(r.output), 2) << args << ": " << r.output;
  }
}

TEST(Cli, GenerateStreamsText) {
  auto r = run_cli("generate --model " + tiny_model().string() + " --prompt 'the quick' --max-tokens 8");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.rfind("the quick", 0), 0u) << r.output;
}

TEST(Cli, PerplexityJson) {
  auto text = test::temp_path("text.txt");
  std::ofstream(text) << "the cat sat on the mat and the dog sat on the log. " << "the grass is green. ";
  auto r = run_cli("perplexity --model " + tiny_model().string() + " --text " + text.string() +
                   " --ctx 16 --stride 8 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = nlohmann::json::parse(r.output);
  EXPECT_GT(j.at("ppl").get<double>(), 1.0);
  EXPECT_GT(j.at("tokens").get<int64_t>(), 10);
  EXPECT_GE(j.at("seconds").get<double>(), 0.0);
  auto missing = run_cli("perplexity --model " + tiny_model().string() + " --text /nonexistent.txt");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("/nonexistent.txt"), std::string::npos);
}

TEST(Cli, ModelInfoAndLogits) {
  auto info = run_cli("model info " + tiny_model().string());
  ASSERT_EQ(info.exit_code, 0) << info.output;
  EXPECT_NE(info.output.find("sha256"), std::string::npos);
  EXPECT_NE(info.output.find("heads           4 query, 2 kv"), std::string::npos) << info.output;
  auto out = test::temp_path("logits.bin");
  auto r = run_cli("logits --model " + tiny_model().string() + " --tokens 1,2,3 --out " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = nlohmann::json::parse(r.output);
  const auto n_vocab = j.at("n_vocab").get<int64_t>();
  EXPECT_EQ(std::filesystem::file_size(out), uint64_t(3 * n_vocab * 4));
}

}  // namespace
}  // namespace inferlab
