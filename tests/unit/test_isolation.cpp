// Runs isolated in worker processes (experiment/worker.h): a plugin that
// crashes, aborts, throws, hangs or allocates without bound fails only its own
// run, recorded with the reason and the hook it was in, and the rest of the
// grid runs. Also: the [experiment] keys that set timeout and memory limit,
// and run records crossing the worker channel unchanged.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <thread>

#include "datasets/tasks.h"
#include "experiment/config.h"
#include "experiment/worker.h"
#include "results/database.h"
#include "test_support.h"

#if defined(__SANITIZE_ADDRESS__)
#define INFERLAB_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define INFERLAB_TEST_ASAN 1
#endif
#endif

namespace inferlab {
namespace {

using namespace std::chrono_literals;

#ifdef INFERLAB_TEST_ASAN
constexpr bool kAddressSanitizer = true;
#else
constexpr bool kAddressSanitizer = false;
#endif

Catalog isolation_catalog() {
  return Catalog{task_catalog(), {PluginEntry{"dense", "1.0.0", "full attention", 0, {}, "/plugins/dense.so"}}};
}

Result<ExperimentConfig> parse_with(const std::string& experiment_keys) {
  return parse_experiment("[experiment]\nname = \"iso\"\n" + experiment_keys +
                              "[model]\nname = \"smollm2-135m\"\n[task]\ntype = \"passkey\"\n",
                          "iso.toml", isolation_catalog());
}

TEST(RunIsolation, TimeoutAndMemoryLimitAreCheckedAndStayOutOfRunHashes) {
  auto plain = parse_with("");
  auto limited = parse_with("timeout = 2.5\nmemory_limit_mb = 1024\n");
  ASSERT_TRUE(plain.ok()) << plain.message();
  ASSERT_TRUE(limited.ok()) << limited.message();
  EXPECT_EQ(plain->timeout, 0.0);
  EXPECT_EQ(plain->memory_limit_mb, 0);
  EXPECT_EQ(limited->timeout, 2.5);
  EXPECT_EQ(limited->memory_limit_mb, 1024);
  auto a = expand_grid(*plain, isolation_catalog(), "abc"), b = expand_grid(*limited, isolation_catalog(), "abc");
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(a->size(), b->size());
  for (size_t i = 0; i < a->size(); ++i) EXPECT_EQ((*a)[i].hash, (*b)[i].hash);

  const std::pair<std::string, std::string> bad[] = {
      {"timeout = 0\n", "iso.toml:3:11: experiment.timeout: value 0 is below the minimum 1"},
      {"timeout = \"3s\"\n", "iso.toml:3:11: experiment.timeout: expected a number, got a string (\"3s\")"},
      {"timeout = inf\n", "iso.toml:3:11: experiment.timeout: value inf is above the maximum"},
      {"memory_limit_mb = 10\n", "iso.toml:3:19: experiment.memory_limit_mb: value 10 is below the minimum 64"},
      {"memory_limit_mb = 1.5\n", "iso.toml:3:19: experiment.memory_limit_mb: expected an integer, got a float (1.5)"},
  };
  for (const auto& [keys, expected] : bad) {
    auto config = parse_with(keys);
    ASSERT_FALSE(config.ok()) << keys;
    EXPECT_NE(config.message().find(expected), std::string::npos) << keys << config.message();
  }
}

TEST(RunIsolation, RecordsCrossTheChannelUnchanged) {
  int ends[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ends), 0);
  auto parent = std::make_unique<Channel>(ends[0]);
  Channel worker(ends[1]);
  RunRecord r;
  r.hash = "abc";
  r.experiment = "iso";
  r.label = "faulty fault=none";
  r.plugin = "faulty";
  r.status = RunStatus::Finished;
  r.baseline = true;
  r.started_at = 1764400000.123456;
  r.finished_at = 1764400001.5;
  r.metrics = {{"perplexity", std::numeric_limits<double>::quiet_NaN(), "ppl"},
               {"ttft_ms", 0.1 + 0.2, "ms"},
               {"kv_bytes_peak", std::numeric_limits<double>::infinity(), "bytes"}};
  SampleRow cut;  // generated text may end inside a UTF-8 character: its bytes cross as they are
  cut.index = 0;
  cut.produced = std::string("caf\xc3", 4) + std::string("\xff\x00z", 3);
  cut.correct = false;
  cut.detail_json = std::string(3 << 20, 'x');  // several socket buffers: read in pieces
  SampleRow plain;
  plain.index = 1;
  plain.expected = "42";
  plain.latency_seconds = 0.25;
  r.samples = {cut, plain};

  // A sender thread: a message larger than the socket's buffer waits for its reader.
  std::thread sender([&] { EXPECT_TRUE(worker.send({{"event", "record"}, {"record", record_to_json(r)}}).ok()); });
  nlohmann::json message;
  auto got = parent->receive(message, std::chrono::steady_clock::now() + 30s);
  sender.join();
  ASSERT_TRUE(got.ok()) << got.message();
  ASSERT_EQ(*got, Channel::Received::Message);
  auto back = record_from_json(message.at("record"));
  ASSERT_TRUE(back.ok()) << back.message();
  EXPECT_EQ(back->hash, r.hash);
  EXPECT_EQ(back->label, r.label);
  EXPECT_EQ(back->status, RunStatus::Finished);
  EXPECT_TRUE(back->baseline);
  EXPECT_EQ(back->started_at, r.started_at);
  ASSERT_EQ(back->metrics.size(), 3u);
  EXPECT_TRUE(std::isnan(back->metrics[0].value));
  EXPECT_EQ(back->metrics[1].value, 0.1 + 0.2);
  EXPECT_EQ(back->metrics[2].value, std::numeric_limits<double>::infinity());
  ASSERT_EQ(back->samples.size(), 2u);
  EXPECT_EQ(back->samples[0].produced, cut.produced);
  EXPECT_EQ(back->samples[0].correct, std::optional<bool>(false));
  EXPECT_EQ(back->samples[0].detail_json, cut.detail_json);
  EXPECT_FALSE(back->samples[1].correct.has_value());
  EXPECT_EQ(back->samples[1].expected, "42");
  EXPECT_EQ(back->samples[1].latency_seconds, 0.25);

  // Nothing sent: the deadline passes. The other end gone: closed.
  auto idle = worker.receive(message, std::chrono::steady_clock::now() + 20ms);
  ASSERT_TRUE(idle.ok());
  EXPECT_EQ(*idle, Channel::Received::TimedOut);
  parent.reset();
  auto closed = worker.receive(message, std::chrono::steady_clock::now() + 10s);
  ASSERT_TRUE(closed.ok());
  EXPECT_EQ(*closed, Channel::Received::Closed);
}

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// The CLI through the shell, without core dumps from the workers that crash
// on purpose, and (in a sanitizer build) with their SIGSEGV left to kill them.
CommandResult run_cli(const std::string& env, const std::string& args) {
  const std::string command = "ulimit -c 0; ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}handle_segv=0 " + env +
                              std::string(INFERLAB_CLI_PATH) + " " + args + " 2>&1";
  CommandResult result;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buffer{};
  for (size_t n; (n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0;) result.output.append(buffer.data(), n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size())) ++n;
  return n;
}

TEST(RunIsolation, BadPluginsFailOnlyTheirOwnRuns) {
  const auto dir = test::temp_path("isolation");
  std::filesystem::create_directories(dir);
  SyntheticModelSpec spec;
  spec.name = "isolation";
  const auto model = dir / "isolation.gguf";
  ASSERT_TRUE(write_synthetic_model(spec, model).ok());
  const auto corpus = dir / "corpus.txt";
  {
    std::ofstream out(corpus);
    for (int i = 0; i < 200; ++i) out << "A quiet morning by the sea, wave " << i << ".\n";
  }
  // One grid: dense, each fault of the faulty plugin with a healthy point
  // among them, and a healthy method after them all. A small timeout for the
  // hang, a memory limit of a few hundred MB for the hog (both larger under
  // AddressSanitizer: slower runs, and a quarantine that keeps freed memory).
  const int timeout_s = kAddressSanitizer ? 10 : 3;
  const int64_t limit_mb = kAddressSanitizer ? 2048 : 512;
  const auto config = dir / "isolation.toml";
  {
    std::ofstream out(config);
    out << "[experiment]\nname = \"isolation\"\ntimeout = " << timeout_s << "\nmemory_limit_mb = " << limit_mb << "\n"
        << "[model]\nname = \"" << model.string() << "\"\nthreads = 2\n"
        << "[task]\ntype = \"perplexity\"\npath = \"" << corpus.string() << "\"\nlength = 32\nsamples = 2\n"
        << "[[method]]\nplugin = \"faulty\"\nfault = [\"segv\", \"none\", \"abort\", \"throw\", \"hang\", \"hog\"]\n"
        << "[[method]]\nplugin = \"probe\"\nneuron_stride = 2\n";
  }
  const std::string plugins = std::string(INFERLAB_TEST_PLUGIN_DIR);
  const std::string env = "INFERLAB_PLUGIN_PATH=" + plugins + "/inferlab-plugin-probe.so:" + plugins +
                          "/inferlab-plugin-faulty.so ";
  const auto db_path = dir / "isolation.db";
  const std::string args = "run " + config.string() + " --db " + db_path.string();

  auto run = run_cli(env, args);
  EXPECT_EQ(run.exit_code, 1) << run.output;  // some runs failed
  EXPECT_NE(run.output.find("experiment isolation: 8 runs, 3 finished, 0 skipped (already done), 5 failed"),
            std::string::npos)
      << run.output;

  auto db = ResultsDb::open(db_path);
  ASSERT_TRUE(db.ok()) << db.message();
  auto rows = db->query("SELECT label, status, error FROM runs");
  ASSERT_TRUE(rows.ok()) << rows.message();
  std::map<std::string, std::pair<std::string, std::string>> runs;  // label: status, error
  for (const auto& row : rows->rows) runs[row[0].value_or("")] = {row[1].value_or(""), row[2].value_or("")};
  ASSERT_EQ(runs.size(), 8u) << run.output;
  for (const char* healthy : {"dense", "faulty fault=none", "probe"})
    EXPECT_EQ(runs[healthy].first, "finished") << healthy << ": " << runs[healthy].second;
  const std::map<std::string, std::string> reasons = {
      {"faulty fault=segv", "plugin faulty, hook evict: the worker process was killed by SIGSEGV"},
      {"faulty fault=abort", "plugin faulty, hook evict: the worker process was killed by SIGABRT"},
      {"faulty fault=throw", "plugin faulty, hook evict: "},
      {"faulty fault=hang", "plugin faulty, hook evict: timed out after " + std::to_string(timeout_s) + " s"},
      {"faulty fault=hog", "plugin faulty, hook evict: "},
  };
  for (const auto& [label, reason] : reasons) {
    EXPECT_EQ(runs[label].first, "failed") << label;
    EXPECT_NE(runs[label].second.find(reason), std::string::npos) << label << ": " << runs[label].second;
  }
  EXPECT_NE(runs["faulty fault=throw"].second.find("faulty: thrown on purpose"), std::string::npos)
      << runs["faulty fault=throw"].second;
  // AddressSanitizer's allocator ends the process itself when memory runs out.
  if (!kAddressSanitizer) {
    EXPECT_NE(runs["faulty fault=hog"].second.find(
                  "plugin faulty, hook evict: memory limit 512 MB exceeded (an allocation failed)"),
              std::string::npos)
        << runs["faulty fault=hog"].second;
  }
  // The healthy point measured what dense measured: its evict dropped nothing.
  auto ppl = db->query("SELECT value FROM run_metrics WHERE experiment = 'isolation' AND metric = 'perplexity' "
                       "AND label IN ('dense', 'faulty fault=none')");
  ASSERT_TRUE(ppl.ok());
  ASSERT_EQ(ppl->rows.size(), 2u);
  const double dense = std::stod(ppl->rows[0][0].value_or("0")), none = std::stod(ppl->rows[1][0].value_or("0"));
  EXPECT_NEAR(none, dense, 1e-6 * dense);

  // Failed runs stay pending; finished ones are done.
  auto plan = run_cli(env, args + " --dry-run");
  ASSERT_EQ(plan.exit_code, 0) << plan.output;
  EXPECT_EQ(count(plan.output, "  done"), 3u) << plan.output;
  EXPECT_EQ(count(plan.output, "  pending"), 5u) << plan.output;
}

TEST(RunIsolation, WorkerModeNeedsAParent) {
  auto r = run_cli("", "run /nonexistent.toml --worker --memory-limit-mb 256 3<&- 4<&-");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("--worker: this process has no parent `inferlab run`"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace inferlab
