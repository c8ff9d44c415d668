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
#include <iterator>
#include <limits>
#include <map>
#include <thread>

#include "datasets/tasks.h"
#include "experiment/config.h"
#include "experiment/worker.h"
#include "model/synthetic_model.h"
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
namespace test_isolation {

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

// A small text corpus for perplexity tasks: `lines` numbered lines.
void write_corpus(const std::filesystem::path& path, const std::string& line, int lines) {
  std::ofstream out(path);
  for (int i = 0; i < lines; ++i) out << line << i << ".\n";
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
  write_corpus(corpus, "A quiet morning by the sea, wave ", 200);
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

// A grid of dense and the probe plugin on a small synthetic model, its
// results in `db`; returns the config's path.
std::filesystem::path small_grid(const std::filesystem::path& dir, const std::string& name) {
  std::filesystem::create_directories(dir);
  SyntheticModelSpec spec;
  spec.name = name;
  const auto model = dir / (name + ".gguf");
  EXPECT_TRUE(write_synthetic_model(spec, model).ok());
  const auto corpus = dir / "corpus.txt";
  write_corpus(corpus, "Rain over the hills, line ", 100);
  const auto config = dir / (name + ".toml");
  std::ofstream out(config);
  out << "[experiment]\nname = \"" << name << "\"\n"
      << "[model]\nname = \"" << model.string() << "\"\nthreads = 1\n"
      << "[task]\ntype = \"perplexity\"\npath = \"" << corpus.string() << "\"\nlength = 24\nsamples = 1\n"
      << "[[method]]\nplugin = \"probe\"\nneuron_stride = 2\n";
  return config;
}

std::string probe_env() {
  return "INFERLAB_PLUGIN_PATH=" + std::string(INFERLAB_TEST_PLUGIN_DIR) + "/inferlab-plugin-probe.so ";
}

// A database that cannot take writes is found before any run: locked by
// another connection, not writable, or on a disk with too little free space.
TEST(ResultsSafety, AnUnwritableDatabaseIsFoundBeforeAnyWork) {
  const auto dir = test::temp_path("db-checks");
  std::filesystem::create_directories(dir);
  const auto path = dir / "locked.db";
  auto holder = ResultsDb::open(path);
  ASSERT_TRUE(holder.ok()) << holder.message();
  auto other = ResultsDb::open(path);
  ASSERT_TRUE(other.ok()) << other.message();
  EXPECT_TRUE(other->check_writable(std::chrono::milliseconds(50), 0).ok());

  // Another program holds the write lock.
  ASSERT_TRUE(holder->query("BEGIN IMMEDIATE").ok());
  auto locked = other->check_writable(std::chrono::milliseconds(200), 0);
  ASSERT_FALSE(locked.ok());
  EXPECT_EQ(locked.message(), path.string() + ": locked by another program (no write lock within 0.2 s: another "
                                              "inferlab, or a database browser with uncommitted changes?); close it "
                                              "or pass another --db");
  ASSERT_TRUE(holder->query("ROLLBACK").ok());
  EXPECT_TRUE(other->check_writable(std::chrono::milliseconds(50), 0).ok());

  // Writes refused (as on a read-only file or file system; root passes file
  // permissions, so the connection is made read-only here).
  ASSERT_TRUE(other->query("PRAGMA query_only = 1").ok());
  auto read_only = other->check_writable(std::chrono::milliseconds(50), 0);
  ASSERT_FALSE(read_only.ok());
  EXPECT_EQ(read_only.message(),
            path.string() + ": read-only (the file, its folder or its file system); pass a writable --db");
  ASSERT_TRUE(other->query("PRAGMA query_only = 0").ok());

  // Too little free space: more than any disk has.
  auto full = other->check_writable(std::chrono::milliseconds(50), std::uintmax_t(1) << 62);
  ASSERT_FALSE(full.ok());
  EXPECT_NE(full.message().find(path.string() + ": the disk holding it has "), std::string::npos) << full.message();
  EXPECT_NE(full.message().find("MiB kept for recording runs (INFERLAB_DB_MIN_FREE_MB)"), std::string::npos)
      << full.message();

  // The same through `inferlab run`, before a worker starts: nothing recorded.
  const auto config = small_grid(dir, "dbcheck");
  const auto db_path = dir / "dbcheck.db";
  auto refused = run_cli(probe_env() + "INFERLAB_DB_MIN_FREE_MB=4611686018427 ",
                         "run " + config.string() + " --db " + db_path.string());
  EXPECT_EQ(refused.exit_code, 1) << refused.output;
  EXPECT_NE(refused.output.find(db_path.string() + ": the disk holding it has "), std::string::npos) << refused.output;
  EXPECT_EQ(refused.output.find("[run 1/"), std::string::npos) << refused.output;
}

// A run that ends when the database cannot take it is kept beside the
// database, the grid stops with the reason, and the next `inferlab run`
// records it without running it again.
TEST(ResultsSafety, ARunTheDatabaseRefusesIsKeptAndRecordedNextTime) {
  const auto dir = test::temp_path("db-unsaved");
  const auto config = small_grid(dir, "unsaved");
  const auto db_path = dir / "unsaved.db";
  {
    auto db = ResultsDb::open(db_path);
    ASSERT_TRUE(db.ok()) << db.message();
    // Stands for a disk that fills up during the grid: the probe's run cannot be written.
    ASSERT_TRUE(db->query("CREATE TRIGGER refuse_probe BEFORE INSERT ON runs WHEN NEW.label = 'probe' "
                          "BEGIN SELECT RAISE(ABORT, 'disk I/O error (simulated)'); END")
                    .ok());
  }
  const std::string args = "run " + config.string() + " --db " + db_path.string();
  auto first = run_cli(probe_env(), args);
  EXPECT_EQ(first.exit_code, 1) << first.output;
  EXPECT_NE(first.output.find("run \"probe\" (finished) ended but could not be recorded: "), std::string::npos)
      << first.output;
  EXPECT_NE(first.output.find("disk I/O error (simulated)"), std::string::npos) << first.output;
  std::vector<std::filesystem::path> kept;
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    if (entry.path().filename().string().rfind("unsaved.db.unsaved-", 0) == 0) kept.push_back(entry.path());
  ASSERT_EQ(kept.size(), 1u) << first.output;
  EXPECT_NE(first.output.find("it is kept in " + kept[0].string()), std::string::npos) << first.output;

  {
    auto db = ResultsDb::open(db_path);
    ASSERT_TRUE(db.ok()) << db.message();
    ASSERT_TRUE(db->query("DROP TRIGGER refuse_probe").ok());
    auto rows = db->query("SELECT label, status FROM runs ORDER BY id");
    ASSERT_TRUE(rows.ok());
    ASSERT_EQ(rows->rows.size(), 1u);  // dense, recorded before the probe
    EXPECT_EQ(rows->rows[0][0].value_or(""), "dense");
  }
  auto second = run_cli(probe_env(), args);
  EXPECT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("recorded run \"probe\" kept in " + kept[0].string()), std::string::npos)
      << second.output;
  EXPECT_NE(second.output.find("2 runs, 0 finished, 2 skipped (already done), 0 failed"), std::string::npos)
      << second.output;
  EXPECT_FALSE(std::filesystem::exists(kept[0]));
  auto db = ResultsDb::open(db_path);
  ASSERT_TRUE(db.ok()) << db.message();
  auto rows = db->query("SELECT label, status FROM runs ORDER BY label");
  ASSERT_TRUE(rows.ok());
  ASSERT_EQ(rows->rows.size(), 2u);
  EXPECT_EQ(rows->rows[1][0].value_or(""), "probe");
  EXPECT_EQ(rows->rows[1][1].value_or(""), "finished");
}

// A grid whose runs cannot fit in the worker's memory limit is refused before
// any run, with the estimate: here the f32 copy of a large vocabulary's
// embedding (a 300,000-token vocabulary, 64 wide: 73 MiB as f32, 10 MiB as Q4_0 on disk).
TEST(ResultsSafety, AGridAboveTheMemoryLimitIsRefusedWithTheEstimate) {
  const auto dir = test::temp_path("memory-estimate");
  std::filesystem::create_directories(dir);
  SyntheticModelSpec spec;
  spec.name = "wide-vocab";
  spec.n_vocab = 300000;
  spec.weight_type = gguf::TensorType::Q4_0;
  const auto model = dir / "wide-vocab.gguf";
  ASSERT_TRUE(write_synthetic_model(spec, model).ok());
  const auto corpus = dir / "corpus.txt";
  write_corpus(corpus, "Snow on the roofs, line ", 100);
  const auto config = dir / "wide.toml";
  {
    std::ofstream out(config);
    out << "[experiment]\nname = \"wide\"\nmemory_limit_mb = 64\n"
        << "[model]\nname = \"" << model.string() << "\"\nthreads = 1\n"
        << "[task]\ntype = \"perplexity\"\npath = \"" << corpus.string() << "\"\nlength = 24\nsamples = 1\n";
  }
  const auto db_path = dir / "wide.db";
  auto refused = run_cli("", "run " + config.string() + " --db " + db_path.string());
  EXPECT_EQ(refused.exit_code, 1) << refused.output;
  EXPECT_NE(refused.output.find("experiment wide: a run needs at least "), std::string::npos) << refused.output;
  EXPECT_NE(refused.output.find("(weights 7"), std::string::npos) << refused.output;
  EXPECT_NE(refused.output.find("more than the worker's memory limit (memory_limit_mb) (64 MiB)"), std::string::npos)
      << refused.output;
  EXPECT_EQ(refused.output.find("[run 1/"), std::string::npos) << refused.output;
  // With room, the same grid runs.
  std::string text;
  {
    std::ifstream in(config);
    text.assign(std::istreambuf_iterator<char>(in), {});
  }
  text.replace(text.find("memory_limit_mb = 64"), 20, "memory_limit_mb = 2048");
  std::ofstream(config) << text;
  auto ran = run_cli("", "run " + config.string() + " --db " + db_path.string());
  EXPECT_EQ(ran.exit_code, 0) << ran.output;
}

// A throughput task's batch holds several sequences' KV at once: the
// estimate counts a batch of its longest requests (or its kv_budget_mb), so a
// batch that cannot fit is refused before any run, though one sequence fits.
// A model of 2 layers 512 wide: 8 KiB of f32 KV per token, 4.1 MiB per
// 520-token request, 260 MiB for 64 of them against a 128 MiB limit.
TEST(ResultsSafety, AThroughputBatchAboveTheMemoryLimitIsRefusedWithTheEstimate) {
  const auto dir = test::temp_path("memory-estimate-batch");
  std::filesystem::create_directories(dir);
  SyntheticModelSpec spec;
  spec.name = "kv-wide";
  spec.n_layers = 2;
  spec.n_embd = 512;
  spec.n_ff = 512;
  spec.n_heads = 8;
  spec.n_kv_heads = 8;
  spec.context_length = 1024;
  const auto model = dir / "kv-wide.gguf";
  ASSERT_TRUE(write_synthetic_model(spec, model).ok());
  const auto corpus = dir / "corpus.txt";
  write_corpus(corpus, "Snow on the roofs, line ", 2000);
  auto refusal = [&](const std::string& batch, const std::string& budget) {
    const auto config = dir / "batch.toml";
    std::ofstream(config) << "[experiment]\nname = \"batch\"\nmemory_limit_mb = 128\n" << batch << "\n"
                          << "[model]\nname = \"" << model.string() << "\"\nthreads = 1\n"
                          << "[task]\ntype = \"throughput\"\npath = \"" << corpus.string()
                          << "\"\nrequests = 64\nprompt_tokens = 512\nnew_tokens = 8\n" << budget;
    return run_cli("", "run " + config.string() + " --db " + (dir / "batch.db").string());
  };
  auto batched = refusal("batch = 64", "");
  EXPECT_EQ(batched.exit_code, 1) << batched.output;
  EXPECT_NE(batched.output.find("experiment batch: a run needs at least "), std::string::npos) << batched.output;
  EXPECT_NE(batched.output.find("(64 sequences of a batch)"), std::string::npos) << batched.output;
  EXPECT_EQ(batched.output.find("[run 1/"), std::string::npos) << batched.output;
  auto budgeted = refusal("batch = 64", "kv_budget_mb = 200\n");
  EXPECT_EQ(budgeted.exit_code, 1) << budgeted.output;
  EXPECT_NE(budgeted.output.find("KV cache 200 MiB (a throughput task's kv_budget_mb)"), std::string::npos)
      << budgeted.output;
}

// A per-layer schedule naming a layer the model does not have is refused
// before any run, naming the run and the key (SpAtten's keep, on a 2-layer model).
TEST(ResultsSafety, ASchedulePastTheLastLayerIsRefusedBeforeAnyRun) {
  const auto dir = test::temp_path("schedule-layers");
  std::filesystem::create_directories(dir);
  SyntheticModelSpec spec;
  spec.name = "two-layers";
  const auto model = dir / "two-layers.gguf";
  ASSERT_TRUE(write_synthetic_model(spec, model).ok());
  const auto corpus = dir / "corpus.txt";
  write_corpus(corpus, "Rain over the hills, line ", 100);
  const auto config = dir / "schedule.toml";
  std::ofstream(config) << "[experiment]\nname = \"schedule\"\n"
                        << "[model]\nname = \"" << model.string() << "\"\nthreads = 1\n"
                        << "[task]\ntype = \"perplexity\"\npath = \"" << corpus.string()
                        << "\"\nlength = 24\nsamples = 1\n"
                        << "[[method]]\nplugin = \"spatten\"\nkeep = \"0-1=1.0; 5=0.5\"\n";
  auto refused = run_cli("", "run " + config.string() + " --db " + (dir / "schedule.db").string());
  EXPECT_EQ(refused.exit_code, 1) << refused.output;
  EXPECT_NE(refused.output.find("keep = \"0-1=1.0; 5=0.5\": layer 5 is past the model's last layer 1 (the model "
                                "has 2 layers)"),
            std::string::npos)
      << refused.output;
  EXPECT_EQ(refused.output.find("[run 1/"), std::string::npos) << refused.output;
}

TEST(RunIsolation, WorkerModeNeedsAParent) {
  auto r = run_cli("", "run /nonexistent.toml --worker --memory-limit-mb 256 3<&- 4<&-");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("--worker: this process has no parent `inferlab run`"), std::string::npos) << r.output;
}

}  // namespace test_isolation
}  // namespace inferlab
