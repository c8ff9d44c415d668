// Parameter types beyond scalars (SDK v4): a file behind a `path` parameter
// enters the run hash by its content; a per-layer schedule has one grammar,
// checked with the key named; a list-typed parameter takes a list as its value
// and a list of lists as its grid axis.
#include <gtest/gtest.h>

#include <fstream>

#include "experiment/config.h"
#include "test_support.h"

namespace inferlab {
namespace test_param_types {

Catalog catalog() {
  Catalog c;
  c.tasks.push_back({"passkey", "find the passkey",
                     {{ParamSpec::integer("lengths", 512, 16, std::nullopt, "prompt lengths"), true, {int64_t{256}}}}});
  c.plugins.push_back({"dense", "1.0.0", "full attention", 0, {}, "/plugins/libdense.so"});
  c.plugins.push_back({"typed", "1.0.0", "every parameter type", 0,
                       {ParamSpec::path("adapter", "a file the method reads"),
                        ParamSpec::schedule("keep", "", 0.0, 1.0, "kept fraction per layer"),
                        ParamSpec::float_list("ratios", {0.5}, 0.0, 1.0, "ratios"),
                        ParamSpec::int_list("budgets", {64}, 1, std::nullopt, "budgets"),
                        ParamSpec::path_list("adapters", "files or folders the method reads, all at once")},
                       "/plugins/libtyped.so"});
  return c;
}

std::string config(const std::string& method_lines) {
  return "[experiment]\nname = \"typed\"\n[model]\nname = \"m\"\n[task]\ntype = \"passkey\"\n"
         "[[method]]\nplugin = \"typed\"\n" + method_lines;  // method keys start on line 9
}

Result<std::vector<RunSpec>> grid(const std::string& text, const std::filesystem::path& source) {
  auto parsed = parse_experiment(text, source.string(), catalog());
  if (!parsed) return parsed.error();
  return expand_grid(*parsed, catalog(), "abc");
}

TEST(ParamTypes, AFileEntersTheRunHashByItsContent) {
  const auto dir = test::temp_path("paths");
  std::filesystem::create_directories(dir);
  const auto exp = dir / "exp.toml";
  std::ofstream(dir / "adapter.bin") << "weights v1";
  auto first = grid(config("adapter = \"adapter.bin\"\n"), exp);  // next to the config
  ASSERT_TRUE(first.ok()) << first.message();
  ASSERT_EQ(first->size(), 2u);
  EXPECT_EQ((*first)[1].params.get_string("adapter"), (dir / "adapter.bin").string());
  EXPECT_NE((*first)[1].config_json.find("\"adapter\":\"sha256:"), std::string::npos) << (*first)[1].config_json;
  // The same content elsewhere: the same run. Edited: a new run.
  std::filesystem::create_directories(dir / "moved");
  std::ofstream(dir / "moved" / "a.bin") << "weights v1";
  auto moved = grid(config("adapter = \"moved/a.bin\"\n"), exp);
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ((*moved)[1].hash, (*first)[1].hash);
  std::ofstream(dir / "adapter.bin") << "weights v2";
  auto edited = grid(config("adapter = \"adapter.bin\"\n"), exp);
  ASSERT_TRUE(edited.ok());
  EXPECT_NE((*edited)[1].hash, (*first)[1].hash);
  EXPECT_EQ((*edited)[0].hash, (*first)[0].hash);  // the dense baseline is untouched
  // A missing file is refused where it is written.
  auto missing = parse_experiment(config("adapter = \"nope.bin\"\n"), exp.string(), catalog());
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.message().find("exp.toml:9:11: method[1].adapter: file or folder not found: " +
                                   (dir / "nope.bin").string()),
            std::string::npos)
      << missing.message();
}

TEST(ParamTypes, AFolderEntersTheRunHashByItsFilesNamesAndContents) {
  // A PEFT adapter is a folder: its files' names and contents key the run,
  // wherever it lies.
  const auto dir = test::temp_path("folders");
  const auto exp = dir / "exp.toml";
  auto make = [&](const std::string& name) {
    std::filesystem::create_directories(dir / name / "sub");
    std::ofstream(dir / name / "adapter_config.json") << "{\"r\": 4}";
    std::ofstream(dir / name / "sub" / "weights.bin") << "w";
  };
  make("a");
  make("b");
  auto hash_of = [&](const std::string& name) {
    auto runs = grid(config("adapter = \"" + name + "\"\n"), exp);
    EXPECT_TRUE(runs.ok()) << runs.message();
    return runs.ok() ? (*runs)[1].hash : std::string();
  };
  const std::string a = hash_of("a");
  EXPECT_FALSE(a.empty());
  EXPECT_EQ(hash_of("b"), a);  // the same files elsewhere
  std::ofstream(dir / "b" / "sub" / "weights.bin") << "w2";
  const std::string edited = hash_of("b");
  EXPECT_NE(edited, a);
  std::filesystem::rename(dir / "b" / "sub" / "weights.bin", dir / "b" / "sub" / "renamed.bin");
  EXPECT_NE(hash_of("b"), edited);
  std::ofstream(dir / "a" / "extra") << "";
  EXPECT_NE(hash_of("a"), a);
}

TEST(ParamTypes, ScheduleGrammar) {
  std::string why;
  auto s = parse_layer_schedule("0-1=1.0; 2-9=0.6; 10-29 = 0.3", &why);
  ASSERT_TRUE(s) << why;
  EXPECT_EQ(s->ranges.size(), 3u);
  EXPECT_EQ(s->at(0, -1), 1.0);
  EXPECT_EQ(s->at(9, -1), 0.6);
  EXPECT_EQ(s->at(29, -1), 0.3);
  EXPECT_EQ(s->at(30, -1), -1);  // uncovered layers take the fallback
  EXPECT_EQ(s->check_layers(30), "");
  EXPECT_EQ(s->check_layers(20), "layer 29 is past the model's last layer 19");
  ASSERT_TRUE(parse_layer_schedule("5=0.2;"));
  ASSERT_TRUE(parse_layer_schedule(""));
  for (const auto& [text, reason] :
       {std::pair{"0-3=1; 2-5=0.5", "layer 2 is in two ranges"}, std::pair{"5-2=1", "range 5-2 ends before it starts"},
        std::pair{"1-2=x", "\"x\" (for layers 1-2) is not a number"}, std::pair{"1-2", "\"1-2\" has no \"=value\""},
        std::pair{"a=1", "\"a\" is not a layer or a range FIRST-LAST of layers"},
        std::pair{"-1=1", "\"-1\" is not a layer or a range FIRST-LAST of layers"}}) {
    EXPECT_FALSE(parse_layer_schedule(text, &why)) << text;
    EXPECT_EQ(why, reason) << text;
  }
}

TEST(ParamTypes, ABadScheduleIsRefusedWithItsKey) {
  const auto exp = test::temp_path("sched") / "exp.toml";
  auto good = grid(config("keep = \"0-1=1.0; 2-9=0.6\"\n"), exp);
  ASSERT_TRUE(good.ok()) << good.message();
  EXPECT_EQ((*good)[1].params.get_schedule("keep").at(5, 0), 0.6);
  auto overlap = parse_experiment(config("keep = \"0-3=1; 2-5=0.5\"\n"), "exp.toml", catalog());
  ASSERT_FALSE(overlap.ok());
  EXPECT_NE(overlap.message().find("exp.toml:9:8: method[1].keep: schedule: layer 2 is in two ranges"),
            std::string::npos)
      << overlap.message();
  auto range = parse_experiment(config("keep = \"0-3=1.5\"\n"), "exp.toml", catalog());
  ASSERT_FALSE(range.ok());
  EXPECT_NE(range.message().find("method[1].keep: schedule, layers 0-3: value 1.5 is above the maximum 1"),
            std::string::npos)
      << range.message();
}

TEST(ParamTypes, AListIsTheValueOfAListParameterAndAListOfListsItsAxis) {
  const auto exp = test::temp_path("lists") / "exp.toml";
  auto one = grid(config("ratios = [0.25, 0.5]\nbudgets = [8, 16, 32]\n"), exp);
  ASSERT_TRUE(one.ok()) << one.message();
  ASSERT_EQ(one->size(), 2u);  // the baseline and one run
  EXPECT_EQ((*one)[1].params.get_float_list("ratios"), (std::vector<double>{0.25, 0.5}));
  EXPECT_EQ((*one)[1].params.get_int_list("budgets"), (std::vector<int64_t>{8, 16, 32}));
  auto axis = grid(config("ratios = [[0.25, 0.5], [0.1]]\n"), exp);
  ASSERT_TRUE(axis.ok()) << axis.message();
  ASSERT_EQ(axis->size(), 3u);
  EXPECT_EQ((*axis)[2].params.get_float_list("ratios"), (std::vector<double>{0.1}));
  EXPECT_EQ((*axis)[1].label, "typed ratios=[0.25, 0.5]");
  auto bad = parse_experiment(config("budgets = [8, 0]\n"), "exp.toml", catalog());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("method[1].budgets: value 0 is below the minimum 1"), std::string::npos) << bad.message();
}

TEST(ParamTypes, APathListIsOneValueOfPathsEachHashedByContent) {
  const auto dir = test::temp_path("pathlists");
  std::filesystem::create_directories(dir / "folder");
  const auto exp = dir / "exp.toml";
  std::ofstream(dir / "a.bin") << "a";
  std::ofstream(dir / "folder" / "b.bin") << "b";
  // One string is a one-path list; a list is the value; a list of lists the axis.
  auto one = grid(config("adapters = \"a.bin\"\n"), exp);
  ASSERT_TRUE(one.ok()) << one.message();
  EXPECT_EQ((*one)[1].params.get_path_list("adapters"), (std::vector<std::string>{(dir / "a.bin").string()}));
  auto both = grid(config("adapters = [\"a.bin\", \"folder\"]\n"), exp);
  ASSERT_TRUE(both.ok()) << both.message();
  ASSERT_EQ(both->size(), 2u);
  EXPECT_EQ((*both)[1].params.get_path_list("adapters").size(), 2u);
  EXPECT_NE((*both)[1].config_json.find("\"adapters\":\"[sha256:"), std::string::npos) << (*both)[1].config_json;
  auto axis = grid(config("adapters = [[\"a.bin\"], [\"a.bin\", \"folder\"]]\n"), exp);
  ASSERT_TRUE(axis.ok()) << axis.message();
  ASSERT_EQ(axis->size(), 3u);
  EXPECT_EQ((*axis)[2].hash, (*both)[1].hash);
  // Editing a file inside the folder makes a new run.
  std::ofstream(dir / "folder" / "b.bin") << "b2";
  auto edited = grid(config("adapters = [\"a.bin\", \"folder\"]\n"), exp);
  ASSERT_TRUE(edited.ok());
  EXPECT_NE((*edited)[1].hash, (*both)[1].hash);
  // A missing entry is refused by name; a non-string element by type.
  auto missing = parse_experiment(config("adapters = [\"a.bin\", \"gone\"]\n"), exp.string(), catalog());
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.message().find("method[1].adapters: file or folder not found: " + (dir / "gone").string()),
            std::string::npos)
      << missing.message();
  auto number = parse_experiment(config("adapters = [\"a.bin\", 3]\n"), exp.string(), catalog());
  ASSERT_FALSE(number.ok());
  EXPECT_NE(number.message().find("method[1].adapters: expected a list of file or folder paths"), std::string::npos)
      << number.message();
}

}  // namespace test_param_types
}  // namespace inferlab
