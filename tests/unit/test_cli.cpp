// The inferlab executable: every bad input exits non-zero with one clear line.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/device.h"
#include "test_support.h"

namespace inferlab {
namespace test_cli {

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs the CLI with `env` (e.g. "VAR=value ") prepended to the command line.
CommandResult run_cli_env(const std::string& env, const std::string& args) {
  const std::string command = env + std::string(INFERLAB_CLI_PATH) + " " + args + " 2>&1";
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

CommandResult run_cli(const std::string& args) { return run_cli_env("", args); }

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

TEST(Cli, PerplexityCountsOnlyPredictedTokens) {
  auto text = test::temp_path("long.txt");
  {
    std::ofstream out(text);
    for (int i = 0; i < 3000; ++i) out << "the cat sat on the mat " << i << ". ";
  }
  auto r = run_cli("perplexity --model " + tiny_model().string() + " --text " + text.string() +
                   " --ctx 512 --max-tokens 4096 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j.at("tokens").get<int64_t>(), 4088);  // 8 windows of 512, each scoring its last 511
  EXPECT_EQ(j.at("windows").get<int64_t>(), 8);
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

// --method NAME --set key=value: any plugin for one command, no config file.
TEST(Cli, AMethodRunsWithoutAConfigFile) {
  const auto text = test::temp_path("cli-method.txt");
  {
    std::ofstream out(text);
    for (int i = 0; i < 40; ++i) out << "The tide came in and went out again, " << i << " times.\n";
  }
  const std::string base = "perplexity --model " + tiny_model().string() + " --text " + text.string() +
                           " --ctx 96 --max-tokens 200 --json";
  auto dense = run_cli(base);
  ASSERT_EQ(dense.exit_code, 0) << dense.output;
  auto same = run_cli(base + " --method dense");
  ASSERT_EQ(same.exit_code, 0) << same.output;
  // A method that calibrates first (its artifacts in a folder of the test's own).
  const std::string artifacts = "INFERLAB_ARTIFACT_DIR=" + test::temp_path("cli-method-artifacts").string() + " ";
  auto windowed = run_cli_env(artifacts, base + " --method teal --set sparsity=0.5 --set corpus=kv_retrieval"
                                                " --set calibration_samples=2 --set calibration_tokens=32");
  ASSERT_EQ(windowed.exit_code, 0) << windowed.output;
  const auto d = nlohmann::json::parse(dense.output), s = nlohmann::json::parse(same.output),
             w = nlohmann::json::parse(windowed.output);
  EXPECT_EQ(d.at("method"), "dense");
  EXPECT_EQ(w.at("method"), "teal");
  EXPECT_DOUBLE_EQ(s.at("ppl").get<double>(), d.at("ppl").get<double>());
  EXPECT_NE(w.at("ppl").get<double>(), d.at("ppl").get<double>()) << "half the projections' inputs changed nothing";
  // logits and generate take the same options
  auto logits = run_cli("logits --model " + tiny_model().string() +
                        " --tokens 1,2,3,4,5,6,7,8,9,10,11,12 --method streamingllm --set window=4 --set sink_tokens=1");
  EXPECT_EQ(logits.exit_code, 0) << logits.output;
  auto gen = run_cli("generate --model " + tiny_model().string() + " -p hello -n 4 --method streamingllm --set window=4");
  EXPECT_EQ(gen.exit_code, 0) << gen.output;
}

TEST(Cli, BadMethodOptionsAreOneClearLine) {
  const std::string base = "logits --model " + tiny_model().string() + " --tokens 1,2,3";
  const std::pair<std::string, std::string> cases[] = {
      {" --method nosuch", "--method nosuch: no such plugin (found: "},
      {" --set window=4", "--set needs --method"},
      {" --method streamingllm --set window", "--set window: expected key=value"},
      {" --method streamingllm --set bogus=1", "plugin streamingllm has no parameter bogus (its parameters: sink_tokens"},
      {" --method streamingllm --set window=four", "--set window=four: expected an integer"},
      {" --method streamingllm --set window=0", "--set window=0: window: value 0 is below the minimum 1"},
      {" --method streamingllm --set window=4 --set window=5", "--set window=5: window is given twice"},
      {" --method streamingllm --set positions=sideways", "--set positions=sideways: positions:"},
      {" --method lora --set adapter=" + tiny_model().string() + ",/nonexistent/adapter",
       "--set adapter=" + tiny_model().string() + ",/nonexistent/adapter: /nonexistent/adapter: file or folder not found"},
      {" --method lora --set adapter=" + tiny_model().string(),  // a model, not an adapter
       tiny_model().string() + ": general.type is"},
  };
  for (const auto& [args, want] : cases) {
    auto r = run_cli(base + args);
    EXPECT_NE(r.exit_code, 0) << args;
    EXPECT_NE(r.output.find(want), std::string::npos) << args << "\n" << r.output;
    EXPECT_EQ(count_lines(r.output), 1) << args << "\n" << r.output;
  }
}

// ---- experiment commands: run, plugins, query, report, merge ----

std::filesystem::path cli_experiment(const std::string& name, const std::string& method_block) {
  const auto corpus = test::temp_path(name + "-corpus.txt");
  {
    std::ofstream out(corpus);
    for (int i = 0; i < 200; ++i) out << "A quiet morning by the sea, wave " << i << ".\n";
  }
  const auto path = test::temp_path(name + ".toml");
  std::ofstream out(path);
  out << "[experiment]\nname = \"" << name << "\"\n[model]\nname = \"" << tiny_model().string() << "\"\n"
      << "[task]\ntype = \"perplexity\"\npath = \"" << corpus.string() << "\"\nlength = 32\nsamples = 2\n"
      << method_block;
  return path;
}

const std::string kProbeEnv =
    std::string("INFERLAB_PLUGIN_PATH=") + INFERLAB_TEST_PLUGIN_DIR + "/inferlab-plugin-probe.so ";

TEST(CliExperiment, RunQueryReportAndMerge) {
  const auto config = cli_experiment("cli-exp", "[[method]]\nplugin = \"probe\"\nneuron_stride = [2, 4]\n");
  const auto db = test::temp_path("cli.db");
  auto dry = run_cli_env(kProbeEnv, "run " + config.string() + " --db " + db.string() + " --dry-run");
  ASSERT_EQ(dry.exit_code, 0) << dry.output;
  EXPECT_NE(dry.output.find("probe neuron_stride=4"), std::string::npos) << dry.output;
  auto run = run_cli_env(kProbeEnv, "run " + config.string() + " --db " + db.string());
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("3 finished"), std::string::npos) << run.output;

  auto csv = run_cli("query \"SELECT label, value FROM run_metrics WHERE metric='perplexity' ORDER BY label\" --csv --db " +
                     db.string());
  ASSERT_EQ(csv.exit_code, 0) << csv.output;
  EXPECT_EQ(csv.output.rfind("label,value\ndense,", 0), 0u) << csv.output;
  auto json = run_cli("query \"SELECT COUNT(*) AS n FROM runs\" --json --db " + db.string());
  ASSERT_EQ(json.exit_code, 0) << json.output;
  EXPECT_EQ(nlohmann::json::parse(json.output)[0]["n"], 3);
  auto bad_sql = run_cli("query \"SELECT nope FROM nowhere\" --db " + db.string());
  EXPECT_NE(bad_sql.exit_code, 0);
  EXPECT_NE(bad_sql.output.find("nowhere"), std::string::npos) << bad_sql.output;

  auto report = run_cli("report cli-exp --db " + db.string());
  ASSERT_EQ(report.exit_code, 0) << report.output;
  EXPECT_NE(report.output.find("| dense"), std::string::npos) << report.output;
  EXPECT_NE(report.output.find("probe neuron_stride=2"), std::string::npos) << report.output;
  EXPECT_NE(run_cli("report no-such-experiment --db " + db.string()).exit_code, 0);

  const auto merged = test::temp_path("merged.db");
  auto merge = run_cli("merge " + merged.string() + " " + db.string() + " " + db.string());
  ASSERT_EQ(merge.exit_code, 0) << merge.output;
  EXPECT_NE(merge.output.find("3 runs added"), std::string::npos) << merge.output;
  EXPECT_NE(merge.output.find("0 runs added"), std::string::npos) << merge.output;
}

TEST(CliExperiment, CalibrateRunsACalibrationOnceThenFindsIt) {
  const auto corpus = test::temp_path("cli-calibration.txt");
  {
    std::ofstream out(corpus);
    for (int i = 0; i < 200; ++i) out << "Calibration line " << i << " about hills.\n";
  }
  const auto config = cli_experiment("cli-cal", "[[method]]\nplugin = \"probe\"\ncalibrate_samples = 2\n"
                                                "calibrate_corpus = \"" + corpus.string() + "\"\n");
  const std::string env = kProbeEnv + "INFERLAB_ARTIFACT_DIR=" + test::temp_path("cli-artifacts").string() + " ";
  auto first = run_cli_env(env, "calibrate " + config.string());
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_NE(first.output.find("probe: calibrated on 2 samples of 16 tokens"), std::string::npos) << first.output;
  EXPECT_NE(first.output.find("1 calibrations run, 0 found"), std::string::npos) << first.output;
  auto second = run_cli_env(env, "calibrate " + config.string());
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("0 calibrations run, 1 found"), std::string::npos) << second.output;
  auto missing = run_cli("calibrate /nonexistent/cal.toml");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("/nonexistent/cal.toml"), std::string::npos) << missing.output;
}

TEST(CliExperiment, BadConfigAndArgumentsAreRefused) {
  const auto config = cli_experiment("cli-bad", "[[method]]\nplugin = \"probe\"\nneuron_stride = 0\n");
  auto r = run_cli_env(kProbeEnv, "run " + config.string() + " --db " + test::temp_path("bad.db").string());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(config.string() + ":12:17:"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("method[1].neuron_stride"), std::string::npos) << r.output;
  auto shard = run_cli("run " + cli_experiment("cli-shard", "").string() + " --shard 3/2");
  EXPECT_NE(shard.exit_code, 0);
  EXPECT_NE(shard.output.find("--shard"), std::string::npos) << shard.output;
  auto missing = run_cli("run /nonexistent/exp.toml");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("/nonexistent/exp.toml"), std::string::npos) << missing.output;
  auto no_db = run_cli("query \"SELECT 1\" --db /nonexistent/x.db");
  EXPECT_NE(no_db.exit_code, 0);
  EXPECT_NE(no_db.output.find("/nonexistent/x.db"), std::string::npos) << no_db.output;
}

TEST(CliExperiment, PluginsListsVersionsHooksAndParameters) {
  auto r = run_cli_env(kProbeEnv, "plugins");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("dense 1.0.0"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("probe 1.2.0"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("decode_selection"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("neuron_stride"), std::string::npos) << r.output;
  auto refused = run_cli_env(std::string("INFERLAB_PLUGIN_PATH=") + INFERLAB_TEST_PLUGIN_DIR + " ", "plugins");
  EXPECT_NE(refused.output.find("wrong_abi.so: built for plugin ABI version"), std::string::npos) << refused.output;
}

TEST(CliBackend, SynthWritesALoadablePresetModel) {
  const auto path = test::temp_path("synth-tiny.gguf");
  auto r = run_cli("model synth --preset tiny -o " + path.string() + " --type f32");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto model = Model::load(path);
  ASSERT_TRUE(model.ok()) << model.message();
  auto bad = run_cli("model synth --preset llama9 -o " + path.string());
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.output.find("preset \"llama9\""), std::string::npos) << bad.output;
}

TEST(CliBackend, CudaWithoutAGpuIsOneClearLine) {
  if (cuda_compiled() && cuda_device_count() > 0) GTEST_SKIP() << "this machine has a GPU";
  auto r = run_cli("generate --model " + tiny_model().string() + " --prompt hi --backend cuda");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(count_lines(r.output), 1) << r.output;
  EXPECT_NE(r.output.find("--backend"), std::string::npos) << r.output;
  auto bad = run_cli("generate --model " + tiny_model().string() + " --prompt hi --backend tpu");
  EXPECT_NE(bad.exit_code, 0);
}

}  // namespace test_cli
}  // namespace inferlab
