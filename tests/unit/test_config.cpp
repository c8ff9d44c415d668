// Experiment configs: parsing, validation messages (file:line:column: key),
// grid expansion, run hashes and shards.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <set>
#include <tuple>

#include "experiment/config.h"
#include "test_support.h"

namespace inferlab {
namespace test_config {

Catalog test_catalog() {
  Catalog catalog;
  catalog.tasks.push_back({"passkey", "find the passkey",
                           {{ParamSpec::integer("lengths", 512, 16, std::nullopt, "prompt lengths"), true,
                             {int64_t{256}, int64_t{1024}}},
                            {ParamSpec::real("depths", 0.5, 0.0, 1.0, "needle depths"), true, {}},
                            {ParamSpec::integer("samples", 4, 1, std::nullopt, "samples per length"), false, {}}}});
  catalog.tasks.push_back(
      {"perplexity", "score a corpus", {{ParamSpec::string("path", "kjv", {}, "corpus"), false, {}}}});
  catalog.plugins.push_back({"dense", "1.0.0", "full attention", 0, {}, "/plugins/libdense.so"});
  catalog.plugins.push_back({"h2o", "0.3.0", "heavy hitters", 0,
                             {ParamSpec::integer("heavy", 64, 1, std::nullopt, "heavy-hitter tokens kept"),
                              ParamSpec::integer("recent", 64, 0, std::nullopt, "recent tokens kept"),
                              ParamSpec::real("ratio", 0.5, 0.0, 1.0, "a ratio"),
                              ParamSpec::string("mode", "a", {"a", "b"}, "a mode"),
                              ParamSpec::boolean("flag", false, "a flag")},
                             "/plugins/libh2o.so"});
  return catalog;
}

// A valid config; error tests append a line after line 12 (inside [[method]]).
const std::string kBase = R"([experiment]
name = "quickstart"
[model]
name = "smollm2-135m"
[task]
type = "passkey"
lengths = [64, 128]
[[method]]
plugin = "h2o"
name = "h2o-small"
heavy = [32, 64]
recent = [0, 16, 64]
)";

Result<ExperimentConfig> parse(const std::string& text, const std::string& source = "exp.toml") {
  return parse_experiment(text, source, test_catalog());
}

// The message of a config that must be rejected.
std::string errors_of(const std::string& text) {
  auto config = parse(text);
  EXPECT_FALSE(config.ok()) << "accepted:\n" << text;
  return config.ok() ? std::string() : config.message();
}

std::vector<RunSpec> grid_of(const std::string& text, const std::string& checksum = "abc123") {
  auto config = parse(text);
  EXPECT_TRUE(config.ok()) << (config.ok() ? "" : config.message());
  if (!config.ok()) return {};
  auto grid = expand_grid(*config, test_catalog(), checksum);
  EXPECT_TRUE(grid.ok()) << (grid.ok() ? "" : grid.message());
  return grid.ok() ? *grid : std::vector<RunSpec>{};
}

std::vector<std::string> hashes_of(const std::vector<RunSpec>& runs) {
  std::vector<std::string> hashes;
  for (const auto& r : runs) hashes.push_back(r.hash);
  return hashes;
}

// ---- [model] adapter ----

TEST(ConfigModelAdapter, AnAdapterEntersEveryRunsHashByItsContent) {
  const auto dir = test::temp_path("config-adapter");
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "adapter_config.json") << "{}";
  const std::string with = [&] {
    std::string t = kBase;
    t.replace(t.find("[model]\n"), 8, "[model]\nadapter = \"" + dir.string() + "\"\n");
    return t;
  }();
  const auto plain = grid_of(kBase), tuned = grid_of(with);
  ASSERT_EQ(plain.size(), tuned.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    EXPECT_NE(plain[i].hash, tuned[i].hash);  // the dense baseline too
    EXPECT_EQ(tuned[i].model_checksum, plain[i].model_checksum);
    EXPECT_EQ(tuned[i].adapter_digest.rfind("sha256:", 0), 0u);
    EXPECT_EQ(nlohmann::json::parse(tuned[i].config_json)["model"]["adapter"], tuned[i].adapter_digest);
    EXPECT_FALSE(nlohmann::json::parse(plain[i].config_json)["model"].contains("adapter"));
  }
  // Its content, not its path: an edited adapter makes every run pending again.
  std::ofstream(dir / "adapter_config.json") << "{\"r\": 8}";
  const auto edited = grid_of(with);
  ASSERT_EQ(edited.size(), tuned.size());
  EXPECT_NE(edited[0].hash, tuned[0].hash);
  // A scale is part of the run.
  std::string scaled = with;
  scaled.replace(scaled.find("adapter = "), 0, "adapter_scale = 0.5\n");
  EXPECT_NE(grid_of(scaled)[0].hash, edited[0].hash);
}

TEST(ConfigModelAdapter, AMissingOrUnusableAdapterIsRefusedNamingTheKey) {
  auto with = [](const std::string& lines) {
    std::string t = kBase;
    t.replace(t.find("[model]\n"), 8, "[model]\n" + lines + "\n");
    return t;
  };
  const std::string missing = errors_of(with("adapter = \"/no/such/adapter\""));
  EXPECT_NE(missing.find("model.adapter"), std::string::npos) << missing;
  EXPECT_NE(missing.find("/no/such/adapter: no such file or folder"), std::string::npos) << missing;
  EXPECT_NE(errors_of(with("adapter = \"\"")).find("model.adapter: empty"), std::string::npos);
  const auto dir = test::temp_path("config-adapter-file");
  std::filesystem::create_directories(dir);
  const std::string file = errors_of(with("weights = \"file\"\nadapter = \"" + dir.string() + "\""));
  EXPECT_NE(file.find("model.adapter"), std::string::npos) << file;
  EXPECT_NE(file.find("weights = \"f32\""), std::string::npos) << file;
  EXPECT_NE(errors_of(with("adapter_scale = \"big\"")).find("model.adapter_scale"), std::string::npos);
}

// ---- parsing and resolved values ----

TEST(ConfigParse, ValidConfigResolvesGivenValuesAndDefaults) {
  auto config = parse(R"([experiment]
name = "quick.start-1"
seed = 7
backend = "auto"
description = "a test"
[model]
name = "smollm2-135m"
page_size = 32
max_context = 4096
threads = 2
prefill_chunk = 256
[task]
type = "passkey"
lengths = [64, 128]
samples = 2
[[method]]
plugin = "h2o"
heavy = [32, 64]
ratio = 1
)");
  ASSERT_TRUE(config.ok()) << config.message();
  EXPECT_EQ(config->name, "quick.start-1");
  EXPECT_EQ(config->seed, 7);
  EXPECT_EQ(config->backend, "auto");
  EXPECT_EQ(config->description, "a test");
  EXPECT_EQ(config->path, "exp.toml");
  EXPECT_EQ(config->model.name, "smollm2-135m");
  EXPECT_EQ(config->model.page_size, 32);
  EXPECT_EQ(config->model.max_context, 4096);
  EXPECT_EQ(config->model.threads, 2);
  EXPECT_EQ(config->model.prefill_chunk, 256);
  ASSERT_EQ(config->tasks.size(), 1u);
  const TaskParams& task = config->tasks[0].params;
  EXPECT_EQ(config->tasks[0].type, "passkey");
  EXPECT_EQ(task.get_int_list("lengths"), (std::vector<int64_t>{64, 128}));
  EXPECT_EQ(task.get_float_list("depths"), (std::vector<double>{0.5}));  // default
  EXPECT_EQ(task.get_int("samples"), 2);
  ASSERT_EQ(config->methods.size(), 1u);
  const MethodSection& method = config->methods[0];
  EXPECT_EQ(method.plugin, "h2o");
  EXPECT_EQ(method.label, "h2o");  // no name: the plugin name
  EXPECT_EQ(method.plugin_version, "0.3.0");
  EXPECT_EQ(method.axes.at("heavy"), (std::vector<ParamValue>{int64_t{32}, int64_t{64}}));
  EXPECT_EQ(method.axes.at("recent"), (std::vector<ParamValue>{int64_t{64}}));
  EXPECT_EQ(method.axes.at("ratio"), (std::vector<ParamValue>{1.0}));  // an int where a float is expected converts
  EXPECT_EQ(method.axes.at("mode"), (std::vector<ParamValue>{std::string("a")}));
  EXPECT_EQ(method.axes.at("flag"), (std::vector<ParamValue>{false}));
}

TEST(ConfigParse, OmittedOptionalKeysTakeTheirDefaults) {
  auto config = parse(R"([experiment]
name = "minimal"
[model]
name = "smollm2-135m"
[task]
type = "perplexity"
)");
  ASSERT_TRUE(config.ok()) << config.message();
  EXPECT_EQ(config->seed, 0);
  EXPECT_EQ(config->backend, "cpu");
  EXPECT_EQ(config->description, "");
  EXPECT_EQ(config->model.page_size, 16);
  EXPECT_EQ(config->model.max_context, 0);
  EXPECT_EQ(config->model.threads, 0);
  EXPECT_EQ(config->model.prefill_chunk, 0);
  EXPECT_EQ(config->tasks.at(0).params.get_string("path"), "kjv");
  EXPECT_TRUE(config->methods.empty());
}

TEST(ConfigParse, OmittedListParameterTakesItsDefaultList) {
  auto config = parse("[experiment]\nname = \"x\"\n[model]\nname = \"m\"\n[task]\ntype = \"passkey\"\n");
  ASSERT_TRUE(config.ok()) << config.message();
  EXPECT_EQ(config->tasks.at(0).params.get_int_list("lengths"), (std::vector<int64_t>{256, 1024}));
  EXPECT_EQ(config->tasks.at(0).params.get_float_list("depths"), (std::vector<double>{0.5}));
}

TEST(ConfigParse, SeveralTaskTablesKeepTheirOrder) {
  auto config = parse(R"([experiment]
name = "two"
[model]
name = "smollm2-135m"
[[task]]
type = "perplexity"
[[task]]
type = "passkey"
lengths = 64
)");
  ASSERT_TRUE(config.ok()) << config.message();
  ASSERT_EQ(config->tasks.size(), 2u);
  EXPECT_EQ(config->tasks[0].type, "perplexity");
  EXPECT_EQ(config->tasks[1].type, "passkey");
  // A scalar for a list parameter is a one-element list.
  EXPECT_EQ(config->tasks[1].params.get_int_list("lengths"), (std::vector<int64_t>{64}));
}

// ---- errors: each names file:line:column and the key ----

TEST(ConfigErrors, UnknownTopLevelTableAndKey) {
  const std::string message = errors_of(kBase + "[extra]\nx = 1\n");
  EXPECT_NE(message.find("exp.toml:13:2: extra: unknown table"), std::string::npos) << message;
  const std::string key = errors_of("answer = 42\n" + kBase);
  EXPECT_NE(key.find("exp.toml:1:1: answer: unknown key"), std::string::npos) << key;
}

TEST(ConfigErrors, UnknownKeyInsideASection) {
  const std::string message = errors_of(R"([experiment]
name = "x"
colour = "red"
[model]
name = "smollm2-135m"
pagesize = 8
[task]
type = "perplexity"
)");
  EXPECT_NE(message.find("exp.toml:3:1: experiment.colour: unknown key (known keys: name, seed, backend, "
                         "description, timeout, memory_limit_mb)"),
            std::string::npos) << message;
  EXPECT_NE(message.find("exp.toml:6:1: model.pagesize: unknown key"), std::string::npos) << message;
}

TEST(ConfigErrors, FloatWhereIntegerExpected) {
  const std::string message = errors_of(kBase + "[[method]]\nplugin = \"h2o\"\nheavy = 32.5\n");
  EXPECT_NE(message.find("exp.toml:15:9: method[2].heavy: expected an integer, got a float (32.5)"),
            std::string::npos) << message;
}

TEST(ConfigErrors, BoolIsNeverANumberAndNumberIsNeverABool) {
  const std::string message = errors_of(kBase + "ratio = true\nflag = 1\n");
  EXPECT_NE(message.find("exp.toml:13:9: method[1].ratio: expected a number, got a boolean (true)"), std::string::npos)
      << message;
  EXPECT_NE(message.find("exp.toml:14:8: method[1].flag: expected true or false, got an integer (1)"),
            std::string::npos) << message;
}

TEST(ConfigErrors, ValueOutOfRangeNamesTheBound) {
  const std::string below = errors_of(kBase + "[[method]]\nplugin = \"h2o\"\nheavy = [32, 0]\n");
  EXPECT_NE(below.find("exp.toml:15:14: method[2].heavy: value 0 is below the minimum 1"), std::string::npos) << below;
  const std::string above = errors_of(kBase + "ratio = 1.5\n");
  EXPECT_NE(above.find("exp.toml:13:9: method[1].ratio: value 1.5 is above the maximum 1"), std::string::npos) << above;
  const std::string page = errors_of(R"([experiment]
name = "x"
[model]
name = "smollm2-135m"
page_size = 0
[task]
type = "perplexity"
)");
  EXPECT_NE(page.find("exp.toml:5:13: model.page_size: value 0 is below the minimum 1"), std::string::npos) << page;
}

TEST(ConfigErrors, StringNotAmongChoices) {
  const std::string message = errors_of(kBase + "mode = \"c\"\n");
  EXPECT_NE(message.find("exp.toml:13:8: method[1].mode: \"c\" is not one of: a, b"), std::string::npos) << message;
  const std::string backend = errors_of(R"([experiment]
name = "x"
backend = "tpu"
[model]
name = "smollm2-135m"
[task]
type = "perplexity"
)");
  EXPECT_NE(backend.find("exp.toml:3:11: experiment.backend: \"tpu\" is not one of: cpu, cuda, auto"),
            std::string::npos) << backend;
}

TEST(ConfigErrors, GpuDtypeMustBeKnown) {
  const std::string message = errors_of(R"([experiment]
name = "x"
[model]
name = "smollm2-135m"
dtype = "fp8"
[task]
type = "perplexity"
)");
  EXPECT_NE(message.find("exp.toml:5:9: model.dtype: \"fp8\" is not one of: f16, bf16"), std::string::npos) << message;
}

TEST(ConfigErrors, WeightSourceMustBeKnown) {
  const std::string message = errors_of(R"([experiment]
name = "x"
[model]
name = "smollm2-135m"
weights = "q4"
[task]
type = "perplexity"
)");
  EXPECT_NE(message.find("exp.toml:5:11: model.weights: \"q4\" is not one of: f32, file"), std::string::npos)
      << message;
}

TEST(ConfigHash, FileWeightsAreAnotherRunAndF32RunsKeepTheirHashes) {
  auto with_weights = [](const std::string& weights) {
    return hashes_of(grid_of("[experiment]\nname = \"x\"\n[model]\nname = \"smollm2-135m\"\n" + weights +
                             "[task]\ntype = \"perplexity\"\n"));
  };
  EXPECT_EQ(with_weights(""), with_weights("weights = \"f32\"\n"));
  EXPECT_NE(with_weights(""), with_weights("weights = \"file\"\n"));
}

TEST(ConfigErrors, KvDtypeMustBeKnown) {
  const std::string message = errors_of(R"([experiment]
name = "x"
[model]
name = "smollm2-135m"
kv_dtype = "f8"
[task]
type = "perplexity"
)");
  EXPECT_NE(message.find("exp.toml:5:12: model.kv_dtype: \"f8\" is not one of: auto, f32, f16, bf16"),
            std::string::npos)
      << message;
}

TEST(ConfigHash, HalfWidthKvPagesAreAnotherRunAndFloatRunsKeepTheirHashes) {
  auto with_kv = [](const std::string& kv) {
    return hashes_of(grid_of("[experiment]\nname = \"x\"\n[model]\nname = \"smollm2-135m\"\n" + kv +
                             "[task]\ntype = \"perplexity\"\n"));
  };
  EXPECT_EQ(with_kv(""), with_kv("kv_dtype = \"f32\"\n"));
  EXPECT_EQ(with_kv(""), with_kv("kv_dtype = \"auto\"\n"));
  EXPECT_NE(with_kv(""), with_kv("kv_dtype = \"f16\"\n"));
  EXPECT_NE(with_kv("kv_dtype = \"f16\"\n"), with_kv("kv_dtype = \"bf16\"\n"));
}

TEST(ConfigHash, GpuDtypeChangesOnlyCudaRunHashes) {
  auto with_dtype = [](const std::string& backend, const std::string& dtype) {
    return hashes_of(grid_of("[experiment]\nname = \"x\"\nbackend = \"" + backend +
                             "\"\n[model]\nname = \"smollm2-135m\"\ndtype = \"" + dtype +
                             "\"\n[task]\ntype = \"perplexity\"\n"));
  };
  // CPU runs have no element type to vary: their hashes stay as they were.
  EXPECT_EQ(with_dtype("cpu", "f16"), with_dtype("cpu", "bf16"));
  EXPECT_NE(with_dtype("cuda", "f16"), with_dtype("cuda", "bf16"));
  EXPECT_NE(with_dtype("cpu", "f16"), with_dtype("cuda", "f16"));
}

TEST(ConfigErrors, UnknownPluginListsTheKnownOnes) {
  const std::string message = errors_of(kBase + "[[method]]\nplugin = \"h2\"\n");
  EXPECT_NE(message.find("exp.toml:14:10: method[2].plugin: unknown plugin \"h2\" (known plugins: dense, h2o)"),
            std::string::npos) << message;
}

TEST(ConfigErrors, UnknownTaskTypeListsTheKnownOnes) {
  const std::string message = errors_of(R"([experiment]
name = "x"
[model]
name = "smollm2-135m"
[task]
type = "needle"
)");
  EXPECT_NE(message.find("exp.toml:6:8: task.type: unknown task \"needle\" (known tasks: passkey, perplexity)"),
            std::string::npos) << message;
}

TEST(ConfigErrors, UnknownParameterListsTheParameters) {
  const std::string plugin = errors_of(kBase + "budget = 3\n");
  EXPECT_NE(plugin.find("exp.toml:13:1: method[1].budget: unknown parameter of plugin \"h2o\" "
                        "(its parameters: heavy, recent, ratio, mode, flag)"),
            std::string::npos) << plugin;
  const std::string task = errors_of(R"([experiment]
name = "x"
[model]
name = "smollm2-135m"
[[task]]
type = "perplexity"
[[task]]
type = "passkey"
length = 64
)");
  EXPECT_NE(task.find("exp.toml:9:1: task[2].length: unknown parameter of task \"passkey\" "
                      "(its parameters: lengths, depths, samples)"),
            std::string::npos) << task;
}

TEST(ConfigErrors, EmptyListAxis) {
  const std::string message = errors_of(kBase + "ratio = []\n");
  EXPECT_NE(message.find("exp.toml:13:9: method[1].ratio: empty list"), std::string::npos) << message;
}

TEST(ConfigErrors, ListForASingleValuedTaskParameter) {
  const std::string message = errors_of(R"([experiment]
name = "x"
[model]
name = "smollm2-135m"
[task]
type = "passkey"
samples = [1, 2]
lengths = [8]
)");
  EXPECT_NE(message.find("exp.toml:7:11: task.samples: takes one value, not a list"), std::string::npos) << message;
  EXPECT_NE(message.find("exp.toml:8:12: task.lengths: value 8 is below the minimum 16"), std::string::npos)
      << message;
}

TEST(ConfigErrors, MissingRequiredSectionsAndKeys) {
  const std::string sections = errors_of("[experiment]\nseed = 1\n");
  EXPECT_NE(sections.find("exp.toml:1:1: experiment.name: missing"), std::string::npos) << sections;
  EXPECT_NE(sections.find("model: missing: add a [model] table"), std::string::npos) << sections;
  EXPECT_NE(sections.find("task: missing: add a [task] table"), std::string::npos) << sections;
  const std::string keys = errors_of(R"([experiment]
name = "x"
[model]
page_size = 8
[task]
lengths = 64
)");
  EXPECT_NE(keys.find("exp.toml:3:1: model.name: missing"), std::string::npos) << keys;
  EXPECT_NE(keys.find("exp.toml:5:1: task.type: missing"), std::string::npos) << keys;
}

TEST(ConfigErrors, InvalidExperimentNameAndWrongSectionType) {
  const std::string name = errors_of(R"([experiment]
name = "my experiment"
[model]
name = "smollm2-135m"
[task]
type = "perplexity"
)");
  EXPECT_NE(name.find("exp.toml:2:8: experiment.name: \"my experiment\" is not a valid name"), std::string::npos)
      << name;
  const std::string section = errors_of("experiment = 3\n[model]\nname = \"m\"\n[task]\ntype = \"perplexity\"\n");
  EXPECT_NE(section.find("exp.toml:1:14: experiment: expected a [experiment] table, got an integer (3)"),
            std::string::npos) << section;
}

TEST(ConfigErrors, AllErrorsAreReportedAtOnceInFileOrder) {
  const std::string message = errors_of(R"([experiment]
name = "x"
seed = -1
[model]
name = "smollm2-135m"
threads = 1.5
[task]
type = "passkey"
depths = [0.5, 2.0]
[[method]]
plugin = "h2o"
heavy = 0
mode = "z"
)");
  const std::vector<std::string> expected = {
      "exp.toml:3:8: experiment.seed: value -1 is below the minimum 0",
      "exp.toml:6:11: model.threads: expected an integer, got a float (1.5)",
      "exp.toml:9:16: task.depths: value 2 is above the maximum 1",
      "exp.toml:12:9: method[1].heavy: value 0 is below the minimum 1",
      "exp.toml:13:8: method[1].mode: \"z\" is not one of: a, b",
  };
  std::string joined;
  for (const auto& line : expected) joined += (joined.empty() ? "" : "\n") + line;
  EXPECT_EQ(message, joined);
}

TEST(ConfigErrors, TomlSyntaxErrorNamesFileLineAndColumn) {
  const std::string message = errors_of("[experiment]\nname = \"x\nseed = 1\n");
  EXPECT_EQ(message.rfind("exp.toml:2:", 0), 0u) << message;
  EXPECT_NE(message.find("TOML syntax error"), std::string::npos) << message;
}

TEST(ConfigErrors, MissingFileIsNamed) {
  const auto path = test::temp_path("does-not-exist.toml");
  auto config = load_experiment(path, test_catalog());
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.message().find(path.string()), std::string::npos) << config.message();
  EXPECT_NE(config.message().find("not found"), std::string::npos) << config.message();
}

// ---- relative paths ----

// A minimal config read as /data/exps/exp.toml.
ExperimentConfig config_in_exps(const std::string& model, const std::string& task_lines = "") {
  auto config = parse("[experiment]\nname = \"x\"\n[model]\nname = \"" + model +
                          "\"\n[task]\ntype = \"perplexity\"\n" + task_lines,
                      "/data/exps/exp.toml");
  EXPECT_TRUE(config.ok()) << (config.ok() ? "" : config.message());
  return config.ok() ? *config : ExperimentConfig{};
}

TEST(ConfigPaths, ModelPathsResolveAgainstTheConfigFolder) {
  EXPECT_EQ(config_in_exps("../models/tiny.gguf").model.name, "/data/models/tiny.gguf");
  EXPECT_EQ(config_in_exps("tiny.gguf").model.name, "/data/exps/tiny.gguf");
  EXPECT_EQ(config_in_exps("models/tiny").model.name, "/data/exps/models/tiny");
  EXPECT_EQ(config_in_exps("/abs/tiny.gguf").model.name, "/abs/tiny.gguf");
  EXPECT_EQ(config_in_exps("smollm2-135m").model.name, "smollm2-135m");  // a short name
}

TEST(ConfigPaths, TaskPathParametersResolveAgainstTheConfigFolder) {
  const auto corpus = [](const std::string& path) {
    const auto config = config_in_exps("m", "path = \"" + path + "\"\n");
    return config.tasks.empty() ? std::string() : config.tasks[0].params.get_string("path");
  };
  EXPECT_EQ(corpus("corpora/book.txt"), "/data/exps/corpora/book.txt");
  EXPECT_EQ(corpus("book.txt"), "/data/exps/book.txt");
  EXPECT_EQ(corpus("./texts/book"), "/data/exps/texts/book");
  EXPECT_EQ(corpus("kjv"), "kjv");  // a corpus short name
}

TEST(ConfigPaths, LoadedConfigHasAnAbsolutePathAndResolvesNextToIt) {
  const auto dir = test::temp_path("config-dir");
  std::filesystem::create_directories(dir);
  const auto file = dir / "exp.toml";
  std::ofstream(file) << "[experiment]\nname = \"x\"\n[model]\nname = \"m.gguf\"\n[task]\ntype = \"perplexity\"\n";
  auto config = load_experiment(file, test_catalog());
  ASSERT_TRUE(config.ok()) << config.message();
  EXPECT_EQ(config->path, std::filesystem::absolute(file).lexically_normal().string());
  EXPECT_EQ(config->model.name, (std::filesystem::absolute(dir) / "m.gguf").lexically_normal().string());
}

// ---- grid ----

TEST(ConfigGrid, BaselineThenCartesianProductInDeclarationOrderLastAxisFastest) {
  // recent is written before heavy, but heavy is declared first by the plugin.
  const auto runs = grid_of(R"([experiment]
name = "g"
[model]
name = "m"
[task]
type = "passkey"
[[method]]
plugin = "h2o"
recent = [0, 16, 64]
heavy = [32, 64]
)");
  ASSERT_EQ(runs.size(), 7u);
  EXPECT_TRUE(runs[0].baseline);
  EXPECT_EQ(runs[0].plugin, "dense");
  EXPECT_EQ(runs[0].plugin_version, "1.0.0");
  const std::vector<std::pair<int64_t, int64_t>> expected = {{32, 0}, {32, 16}, {32, 64}, {64, 0}, {64, 16}, {64, 64}};
  for (size_t i = 0; i < expected.size(); ++i) {
    const RunSpec& run = runs[i + 1];
    EXPECT_FALSE(run.baseline);
    EXPECT_EQ(run.plugin, "h2o");
    EXPECT_EQ(run.params.get_int("heavy"), expected[i].first) << i;
    EXPECT_EQ(run.params.get_int("recent"), expected[i].second) << i;
    EXPECT_EQ(run.params.get_float("ratio"), 0.5);  // every declared parameter present
    EXPECT_EQ(run.params.get_string("mode"), "a");
    EXPECT_FALSE(run.params.get_bool("flag"));
  }
  for (size_t i = 0; i < runs.size(); ++i) EXPECT_EQ(runs[i].index, int64_t(i));
}

TEST(ConfigGrid, LabelsNameTheMethodAndOnlyTheAxesThatVary) {
  const auto runs = grid_of(kBase + "ratio = 0.25\n[[method]]\nplugin = \"h2o\"\nheavy = 16\n");
  ASSERT_EQ(runs.size(), 8u);
  EXPECT_EQ(runs[0].label, "dense");
  EXPECT_EQ(runs[1].label, "h2o-small heavy=32 recent=0");
  EXPECT_EQ(runs[6].label, "h2o-small heavy=64 recent=64");
  EXPECT_EQ(runs[7].label, "h2o");
}

TEST(ConfigGrid, EveryTaskGetsItsOwnBaselineFirst) {
  const auto runs = grid_of(R"([experiment]
name = "g"
[model]
name = "m"
[[task]]
type = "passkey"
[[task]]
type = "perplexity"
[[method]]
plugin = "h2o"
heavy = [8, 16]
)");
  ASSERT_EQ(runs.size(), 6u);
  const std::vector<std::pair<std::string, std::string>> expected = {
      {"passkey", "dense"},    {"passkey", "h2o heavy=8"},    {"passkey", "h2o heavy=16"},
      {"perplexity", "dense"}, {"perplexity", "h2o heavy=8"}, {"perplexity", "h2o heavy=16"}};
  for (size_t i = 0; i < runs.size(); ++i) {
    EXPECT_EQ(runs[i].task.type, expected[i].first) << i;
    EXPECT_EQ(runs[i].label, expected[i].second) << i;
    EXPECT_EQ(runs[i].baseline, expected[i].second == "dense") << i;
    EXPECT_EQ(runs[i].task_index, i / 3) << i;  // the run carries its task's place in the config
  }
}

TEST(ConfigGrid, ExplicitDenseMethodAndRepeatedPointsAreDropped) {
  const auto runs = grid_of(R"([experiment]
name = "g"
[model]
name = "m"
[task]
type = "passkey"
[[method]]
plugin = "dense"
name = "full"
[[method]]
plugin = "h2o"
heavy = [8, 8, 16]
)");
  ASSERT_EQ(runs.size(), 3u);
  EXPECT_EQ(runs[0].label, "dense");
  EXPECT_TRUE(runs[0].baseline);
  EXPECT_EQ(runs[1].params.get_int("heavy"), 8);
  EXPECT_EQ(runs[2].params.get_int("heavy"), 16);
  EXPECT_EQ(runs[2].index, 2);  // indices stay contiguous after dropping
}

TEST(ConfigGrid, MissingDensePluginIsAnError) {
  auto config = parse(kBase);
  ASSERT_TRUE(config.ok()) << config.message();
  Catalog catalog = test_catalog();
  catalog.plugins.erase(catalog.plugins.begin());
  auto grid = expand_grid(*config, catalog, "abc");
  ASSERT_FALSE(grid.ok());
  EXPECT_NE(grid.message().find("\"dense\""), std::string::npos) << grid.message();
}

TEST(ConfigGrid, ConfigJsonIsCanonicalAndHashedWithSha256) {
  const auto runs = grid_of(kBase);
  ASSERT_FALSE(runs.empty());
  // Pinned: a change here changes every stored run hash, so old results stop matching.
  EXPECT_EQ(runs[0].config_json,
            R"({"backend":"cpu","experiment":"quickstart","measurement":4,"model":{"checksum":"abc123","max_context":0,)"
            R"("page_size":16,"prefill_chunk":0},"params":{},"plugin":{"name":"dense",)"
            R"("version":"1.0.0"},"seed":0,"task":{"params":{"depths":["0.5"],"lengths":[64,128],"samples":[4]},)"
            R"("type":"passkey"}})");
  EXPECT_EQ(runs[0].hash, sha256_hex(runs[0].config_json));
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const auto json = nlohmann::json::parse(runs[1].config_json);
  EXPECT_EQ(json["params"]["ratio"], "0.5");  // floats as canonical text
  EXPECT_EQ(json["params"]["heavy"], 32);
  EXPECT_EQ(json["params"]["flag"], false);
}

// ---- hashes ----

TEST(ConfigHash, SameConfigGivesSameHashes) {
  const auto first = grid_of(kBase);
  const auto second = grid_of(kBase);
  ASSERT_EQ(first.size(), 7u);
  EXPECT_EQ(hashes_of(first), hashes_of(second));
  const auto hashes = hashes_of(first);
  EXPECT_EQ(std::set<std::string>(hashes.begin(), hashes.end()).size(), first.size());  // all distinct
}

TEST(ConfigHash, ChangingAParameterChangesOnlyThoseRuns) {
  const auto base = grid_of(kBase);
  const auto changed = grid_of(kBase + "ratio = 0.75\n");
  ASSERT_EQ(base.size(), changed.size());
  EXPECT_EQ(base[0].hash, changed[0].hash);  // the baseline does not depend on the method
  for (size_t i = 1; i < base.size(); ++i) EXPECT_NE(base[i].hash, changed[i].hash) << i;
}

TEST(ConfigHash, SeedTaskAndModelChecksumChangeEveryHash) {
  const auto base = grid_of(kBase);
  std::string seeded = kBase;
  seeded.insert(seeded.find("[model]"), "seed = 1\n");
  std::string longer = kBase;
  longer.replace(longer.find("[64, 128]"), 9, "[64, 256]");
  for (const auto& other : {grid_of(seeded), grid_of(longer), grid_of(kBase, "def456")}) {
    ASSERT_EQ(other.size(), base.size());
    for (size_t i = 0; i < base.size(); ++i) EXPECT_NE(base[i].hash, other[i].hash) << i;
  }
}

TEST(ConfigHash, ThreadsAndLabelsDoNotChangeHashes) {
  const auto base = grid_of(kBase);
  std::string threaded = kBase;
  threaded.insert(threaded.find("[task]"), "threads = 3\n");
  std::string renamed = kBase;
  renamed.replace(renamed.find("h2o-small"), 9, "another");
  EXPECT_EQ(hashes_of(grid_of(threaded)), hashes_of(base));
  EXPECT_EQ(hashes_of(grid_of(renamed)), hashes_of(base));
}

// ---- shards ----

TEST(ConfigShard, ParsesOneBasedShardsIntoZeroBased) {
  for (const auto& [text, index, count] : std::vector<std::tuple<std::string, int64_t, int64_t>>{
           {"1/1", 0, 1}, {"1/2", 0, 2}, {"2/2", 1, 2}, {"3/8", 2, 8}}) {
    auto shard = parse_shard(text);
    ASSERT_TRUE(shard.ok()) << text << ": " << shard.message();
    EXPECT_EQ(shard->index, index) << text;
    EXPECT_EQ(shard->count, count) << text;
  }
}

TEST(ConfigShard, RejectsMalformedAndOutOfRangeShards) {
  for (const std::string text : {"0/2", "3/2", "a/b", "1/0", "", "1", "1/2/3", "-1/2", " 1/2", "1/2x"}) {
    auto shard = parse_shard(text);
    ASSERT_FALSE(shard.ok()) << "accepted \"" << text << "\"";
    EXPECT_NE(shard.message().find("i/N"), std::string::npos) << shard.message();
  }
}

TEST(ConfigShard, ShardsAreDisjointAndCoverTheGrid) {
  const auto runs = grid_of(kBase);
  ASSERT_EQ(runs.size(), 7u);
  for (int64_t count : {1, 2, 3, 7, 10}) {
    std::vector<int> seen(runs.size(), 0);
    for (int64_t i = 0; i < count; ++i) {
      int64_t previous = -1;
      for (const RunSpec& run : select_shard(runs, Shard{i, count})) {
        EXPECT_EQ(run.index % count, i);
        EXPECT_GT(run.index, previous);  // grid order kept
        previous = run.index;
        ++seen[size_t(run.index)];
      }
    }
    EXPECT_EQ(seen, std::vector<int>(runs.size(), 1)) << count << " shards";
  }
}

}  // namespace test_config
}  // namespace inferlab
