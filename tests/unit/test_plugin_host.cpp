// The plugin host: finding plugins, refusing libraries that are not plugins or
// were built for another ABI, and creating methods from validated parameters.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "plugin_test_support.h"

namespace inferlab {
namespace test_plugin_host {

const std::string kTestPlugins = INFERLAB_TEST_PLUGIN_DIR;

std::string load_error(const std::filesystem::path& file) {
  PluginRegistry registry;
  auto s = registry.load(file);
  return s.ok() ? std::string("(loaded)") : s.message();
}

TEST(PluginHost, FindsTheDensePluginInTheHostFolder) {
  PluginRegistry registry;
  ASSERT_TRUE(registry.scan({INFERLAB_HOST_PLUGIN_DIR}).ok());
  const PluginEntry* dense = registry.find("dense");
  ASSERT_NE(dense, nullptr);
  EXPECT_EQ(dense->hooks, 0u);
  EXPECT_FALSE(dense->version.empty());
  EXPECT_TRUE(registry.problems().empty()) << registry.problems().front();
  // Test-only plugins are not in the host's folder.
  EXPECT_EQ(registry.find("probe"), nullptr);
}

TEST(PluginHost, ProbeDeclaresEveryHookAndItsParameters) {
  const PluginEntry* probe = test::plugin_registry().find("probe");
  ASSERT_NE(probe, nullptr);
  EXPECT_EQ(probe->hooks, kAllHooks);
  EXPECT_EQ(hook_names(probe->hooks).size(), 12u);
  EXPECT_GE(probe->params.size(), 10u);
}

TEST(PluginHost, RefusesALibraryThatIsNotAPlugin) {
  const auto file = kTestPlugins + "/inferlab-plugin-not_a_plugin.so";
  const std::string error = load_error(file);
  EXPECT_NE(error.find(file), std::string::npos) << error;
  EXPECT_NE(error.find("not an inferlab plugin"), std::string::npos) << error;
}

TEST(PluginHost, RefusesAPluginBuiltForAnotherAbiVersion) {
  const auto file = kTestPlugins + "/inferlab-plugin-wrong_abi.so";
  const std::string error = load_error(file);
  EXPECT_NE(error.find(file), std::string::npos) << error;
  EXPECT_NE(error.find("ABI version " + std::to_string(kPluginAbiVersion + 99)), std::string::npos) << error;
  EXPECT_NE(error.find("version " + std::to_string(kPluginAbiVersion)), std::string::npos) << error;
}

TEST(PluginHost, RefusesAFileThatIsNotALibrary) {
  const auto file = test::temp_path("fake.so");
  std::ofstream(file) << "not an ELF file\n";
  const std::string error = load_error(file);
  EXPECT_NE(error.find(file.string()), std::string::npos) << error;
  EXPECT_NE(error.find("not a loadable shared library"), std::string::npos) << error;
  EXPECT_NE(load_error("/nonexistent/inferlab-plugin-x.so").find("/nonexistent/inferlab-plugin-x.so"),
            std::string::npos);
}

TEST(PluginHost, ScanRecordsRefusedLibrariesAndKeepsTheGoodOnes) {
  PluginRegistry registry;
  ASSERT_TRUE(registry.scan({kTestPlugins}).ok());
  EXPECT_NE(registry.find("probe"), nullptr);
  EXPECT_EQ(registry.problems().size(), 2u);  // not_a_plugin and wrong_abi
  // The same plugin found twice keeps the first and reports the second.
  ASSERT_FALSE(registry.load(kTestPlugins + "/inferlab-plugin-probe.so").ok());
}

TEST(PluginHost, SearchPathComesFromTheEnvironmentThenTheHostFolder) {
  ::setenv("INFERLAB_PLUGIN_PATH", "/a/b:/c::/d.so", 1);
  const auto paths = PluginRegistry::default_search_path();
  ::unsetenv("INFERLAB_PLUGIN_PATH");
  ASSERT_EQ(paths.size(), 5u);
  EXPECT_EQ(paths[0], "/a/b");
  EXPECT_EQ(paths[1], "/c");
  EXPECT_EQ(paths[2], "/d.so");
  // Beside the executable (a build tree), then the installed prefix's plugin folder.
  EXPECT_EQ(paths[3].filename(), "plugins");
  EXPECT_EQ(paths[4], paths[3].parent_path().parent_path() / "lib/inferlab/plugins");
}

TEST(PluginHost, CreateFillsDefaultsAndRejectsBadParameters) {
  auto& registry = test::plugin_registry();
  EXPECT_TRUE(registry.create("probe", ParamValues{}).ok());
  auto unknown = registry.create("probe", ParamValues({{"no_such", int64_t{1}}}));
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.message().find("no_such"), std::string::npos);
  auto range = registry.create("probe", ParamValues({{"neuron_stride", int64_t{0}}}));
  ASSERT_FALSE(range.ok());
  EXPECT_NE(range.message().find("below the minimum"), std::string::npos) << range.message();
  auto choice = registry.create("probe", ParamValues({{"kv_fill", std::string("sometimes")}}));
  ASSERT_FALSE(choice.ok());
  EXPECT_NE(choice.message().find("not one of"), std::string::npos) << choice.message();
  auto type = registry.create("probe", ParamValues({{"pattern_block", std::string("4")}}));
  ASSERT_FALSE(type.ok());
  EXPECT_NE(type.message().find("pattern_block: expected int, got \"4\""), std::string::npos) << type.message();
  EXPECT_FALSE(registry.create("nonexistent", ParamValues{}).ok());
}

}  // namespace test_plugin_host
}  // namespace inferlab

namespace inferlab {
namespace test_plugin_host {

// A method's hooks are read off its overrides (hooks_of), so they are declared once.
struct OnlyEvicts : Method {
  void evict(const StepInfo&, const KvView&, int32_t, int32_t, std::vector<int32_t>&) override {}
};
struct ExitsAndLoads : Method {
  Status on_load(const LoadContext&) override { return ok_status(); }
  bool exit_after_layer(const StepInfo&, int32_t, std::span<const float>) override { return false; }
};
struct Derived final : OnlyEvicts {
  RetentionBudget retention_budget(const StepInfo&, int32_t, int32_t) override { return {}; }
};

TEST(PluginHost, SharedParameterNamesMeanTheSameInEveryPlugin) {
  PluginInfo info{"layers", "1.0.0", "", kHookLoad, {ParamSpec::dense_layers(2)}};
  EXPECT_TRUE(check_plugin_info(info).ok());
  for (const ParamSpec& other : {ParamSpec::real("dense_layers", 0.5, 0.0, 1.0, "fraction of layers left dense"),
                                 ParamSpec::integer("dense_layers", 2, -1, 8, "-1: all")}) {
    info.params = {other};
    auto s = check_plugin_info(info);
    ASSERT_FALSE(s.ok()) << other.help;
    EXPECT_NE(s.message().find("plugin layers declares dense_layers otherwise than every plugin"), std::string::npos)
        << s.message();
  }
  // Quest declares it the shared way.
  const PluginEntry* quest = test::plugin_registry().find("quest");
  ASSERT_NE(quest, nullptr);
  const auto it = std::find_if(quest->params.begin(), quest->params.end(),
                               [](const ParamSpec& p) { return p.name == "dense_layers"; });
  ASSERT_NE(it, quest->params.end());
  EXPECT_EQ(it->help, ParamSpec::dense_layers(0).help);
}

TEST(PluginSdk, HooksAreReadOffTheOverrides) {
  static_assert(hooks_of<Method>() == 0);
  static_assert(hooks_of<OnlyEvicts>() == kHookEviction);
  static_assert(hooks_of<ExitsAndLoads>() == (kHookLoad | kHookLayerPlan | kHookLayerExit));
  static_assert(hooks_of<Derived>() == (kHookEviction | kHookRetention));
  EXPECT_EQ(test::plugin_registry().find("probe")->hooks, kAllHooks);
  EXPECT_EQ(test::plugin_registry().find("dense")->hooks, 0u);
}

}  // namespace test_plugin_host
}  // namespace inferlab
