// `inferlab finetune` (finetune/finetune.h, finetune/data.h, the config's
// [finetune] table): on a tiny synthetic model and a repetitive text, the
// training loss and the held-out loss fall and the output is a PEFT folder
// the engine loads; a run interrupted and resumed from its checkpoint ends
// with the same adapter file, byte for byte, as an uninterrupted one, and its
// curve in the results database has each step once; JSONL examples put the
// loss on the response only; a task's samples become prompt + answer; bad
// configs and data are refused naming the key, file or line.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "datasets/tasks.h"
#include "engine/engine.h"
#include "experiment/config.h"
#include "finetune/data.h"
#include "finetune/finetune.h"
#include "formats/gguf_adapter.h"
#include "formats/peft_adapter.h"
#include "results/database.h"
#include "test_support.h"

namespace inferlab {
namespace test_finetune {

namespace fs = std::filesystem;

const fs::path& model_path() {
  static const fs::path path = [] {
    SyntheticModelSpec spec;
    spec.name = "finetune";
    spec.n_layers = 2;
    spec.n_embd = 64;
    spec.n_ff = 96;
    spec.n_heads = 4;
    spec.n_kv_heads = 2;
    spec.seed = 31;
    const auto p = test::temp_path("finetune-model.gguf");
    EXPECT_TRUE(write_synthetic_model(spec, p).ok());
    return p;
  }();
  return path;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// A folder with a repetitive training text and a config over it.
fs::path make_dir(const std::string& name) {
  const fs::path dir = test::temp_path(name);
  fs::create_directories(dir);
  std::ofstream text(dir / "train.txt");
  for (int i = 0; i < 40; ++i) text << "the cat sat on the mat and the dog sat on the log. ";
  return dir;
}

Result<FinetuneConfig> parse(const fs::path& dir, const std::string& finetune_keys) {
  const std::string toml = "[model]\nname = \"" + model_path().string() + "\"\n[finetune]\n" + finetune_keys;
  std::ofstream(dir / "ft.toml") << toml;
  return load_finetune_config(dir / "ft.toml", Catalog{task_catalog(), {}});
}

const std::string kBase =
    "data = \"train.txt\"\ntargets = \"all-linear\"\nr = 4\nalpha = 8\nbatch = 2\nseq_len = 32\nlr = 0.01\n"
    "eval_fraction = 0.2\nlog_every = 100\noutput = \"out\"\n";

TEST(Finetune, TheLossFallsAndTheOutputIsAPeftFolderTheEngineLoads) {
  const fs::path dir = make_dir("learns");
  auto config = parse(dir, kBase + "steps = 30\ncheckpoint_every = 10\ngguf = true\n");
  ASSERT_TRUE(config.ok()) << config.message();
  EXPECT_EQ(config->finetune.name, "ft");
  EXPECT_EQ(config->finetune.targets.size(), 7u);
  EXPECT_EQ(config->finetune.output, (dir / "out").string());
  finetune::FinetuneOptions options;
  options.db = dir / "results.db";
  auto report = finetune::run_finetune(*config, options);
  ASSERT_TRUE(report.ok()) << report.message();
  ASSERT_TRUE(report->eval_loss_before && report->eval_loss_after);
  EXPECT_LT(*report->eval_loss_after, 0.7 * *report->eval_loss_before)
      << "before " << *report->eval_loss_before << " after " << *report->eval_loss_after;
  EXPECT_EQ(report->first_step, 1);
  EXPECT_EQ(report->trainable_parameters, 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 96)));
  EXPECT_GT(report->tokens_per_second, 0);
  EXPECT_GT(report->memory.peak_activation_bytes, 0);
  EXPECT_FALSE(fs::exists(finetune::checkpoint_path(*config))) << "the checkpoint outlived a finished run";

  auto model = Model::load(model_path());
  const ModelConfig& c = (*model)->config();
  const ModelShape shape = model_shape(c);
  auto adapter = peft::read_adapter(dir / "out", shape, c.tied_embeddings);
  ASSERT_TRUE(adapter.ok()) << adapter.message();
  EXPECT_EQ(adapter->size(), 14u);
  EXPECT_FLOAT_EQ((*adapter)[0].adapter.scale, 2.0f);
  // gguf = true: the same adapters for llama.cpp beside the PEFT files.
  auto gguf = gguf_adapter::read_adapter(dir / "out" / "adapter_model.gguf", shape, c.architecture,
                                         c.tied_embeddings);
  ASSERT_TRUE(gguf.ok()) << gguf.message();
  ASSERT_EQ(gguf->size(), adapter->size());
  for (size_t i = 0; i < gguf->size(); ++i) {
    const auto& g = (*gguf)[i];
    const auto same = std::find_if(adapter->begin(), adapter->end(),
                                   [&](const auto& p) { return p.tensor == g.tensor && p.layer == g.layer; });
    ASSERT_NE(same, adapter->end());
    EXPECT_EQ(g.adapter.a, same->adapter.a);
    EXPECT_EQ(g.adapter.b, same->adapter.b);
  }

  // The curve: one row per step, the run finished with its summary.
  auto db = ResultsDb::open(dir / "results.db");
  ASSERT_TRUE(db.ok());
  auto rows = db->query("SELECT count(*), min(step), max(step), count(eval_loss) FROM finetune_steps");
  ASSERT_TRUE(rows.ok());
  EXPECT_EQ(rows->rows[0][0], "30");
  EXPECT_EQ(rows->rows[0][1], "1");
  EXPECT_EQ(rows->rows[0][2], "30");
  EXPECT_EQ(rows->rows[0][3], "1");  // eval_every = 0: at the end only
  auto run = db->query("SELECT status, name, summary_json LIKE '%peak_rss_bytes%' FROM finetunes");
  EXPECT_EQ(run->rows[0][0], "finished");
  EXPECT_EQ(run->rows[0][1], "ft");
  EXPECT_EQ(run->rows[0][2], "1");

  // A second run of the same config refuses to overwrite the adapter.
  auto again = finetune::run_finetune(*config, {});
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.message().find("finetune.output: " + (dir / "out").string() + " already holds files"),
            std::string::npos)
      << again.message();
}

TEST(Finetune, AnInterruptedRunResumesToTheSameAdapterBitForBit) {
  const std::string keys = kBase + "steps = 12\ncheckpoint_every = 4\ndropout = 0.1\ngrad_accum = 2\n"
                                   "schedule = \"cosine\"\nwarmup_steps = 3\nquant = \"nf4\"\n";
  const fs::path straight = make_dir("straight"), resumed = make_dir("resumed");
  auto a = parse(straight, keys), b = parse(resumed, keys);
  ASSERT_TRUE(a.ok() && b.ok()) << a.message() << b.message();
  ASSERT_TRUE(finetune::run_finetune(*a, {}).ok());

  finetune::FinetuneOptions options;
  options.db = resumed / "results.db";
  options.stop_after_step = 6;  // the last checkpoint is step 4: steps 5 and 6 are done twice
  auto first = finetune::run_finetune(*b, options);
  ASSERT_TRUE(first.ok()) << first.message();
  EXPECT_TRUE(first->stopped);
  EXPECT_FALSE(fs::exists(resumed / "out"));
  EXPECT_TRUE(fs::exists(finetune::checkpoint_path(*b)));
  options.stop_after_step = 0;
  auto second = finetune::run_finetune(*b, options);
  ASSERT_TRUE(second.ok()) << second.message();
  EXPECT_EQ(second->first_step, 5);
  EXPECT_EQ(read_file(straight / "out" / "adapter_model.safetensors"),
            read_file(resumed / "out" / "adapter_model.safetensors"));
  EXPECT_EQ(read_file(straight / "out" / "adapter_config.json"), read_file(resumed / "out" / "adapter_config.json"));

  auto db = ResultsDb::open(resumed / "results.db");
  auto rows = db->query("SELECT count(*), count(DISTINCT step) FROM finetune_steps");
  EXPECT_EQ(rows->rows[0][0], "12");
  EXPECT_EQ(rows->rows[0][1], "12");
  EXPECT_EQ(db->query("SELECT count(*) FROM finetunes")->rows[0][0], "1");

  // A checkpoint of another config is refused (not silently reused).
  auto other = parse(resumed, keys + "seed = 5\n");
  ASSERT_TRUE(other.ok());
  options.stop_after_step = 5;
  fs::remove_all(resumed / "out");
  ASSERT_TRUE(finetune::run_finetune(*b, options).ok());  // leaves the step-4 checkpoint of config b
  auto refused = finetune::run_finetune(*other, {});
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("belongs to another fine-tuning config"), std::string::npos) << refused.message();
  finetune::FinetuneOptions restart;
  restart.restart = true;
  restart.stop_after_step = 1;
  EXPECT_TRUE(finetune::run_finetune(*other, restart).ok());
}

TEST(Finetune, JsonlPutsTheLossOnTheResponseAndTasksOnTheirAnswers) {
  const fs::path dir = make_dir("jsonl");
  std::ofstream(dir / "chat.jsonl") << "{\"prompt\": \"Q: colour of the sky?\\nA:\", \"response\": \" blue\"}\n\n"
                                       "{\"text\": \"plain text line\"}\n";
  auto config = parse(dir, "data = \"chat.jsonl\"\nsteps = 1\noutput = \"o\"\n");
  ASSERT_TRUE(config.ok()) << config.message();
  auto model = Model::load(model_path());
  ASSERT_TRUE(model.ok());
  const Tokenizer& tok = (*model)->tokenizer();
  finetune::DataSummary summary;
  auto examples = finetune::load_examples(config->finetune, tok, 1024, &summary);
  ASSERT_TRUE(examples.ok()) << examples.message();
  ASSERT_EQ(examples->size(), 2u);
  const auto& qa = (*examples)[0];
  const auto prompt = tok.encode("Q: colour of the sky?\nA:", tok.add_bos_default(), false);
  const auto answer = tok.encode(" blue", false, false);
  ASSERT_EQ(qa.tokens.size(), prompt.size() + answer.size() + 1);
  for (size_t i = 0; i < qa.tokens.size(); ++i) EXPECT_EQ(qa.predict[i], i >= prompt.size() ? 1 : 0) << i;
  EXPECT_EQ(qa.tokens.back(), tok.eos());
  EXPECT_EQ(summary.targets, int64_t(answer.size() + 1) + int64_t((*examples)[1].tokens.size()) - 1);
  // In a batch, targets sit one position earlier (position t predicts token t + 1).
  const finetune::Batch b = finetune::make_batch(*examples, {0});
  EXPECT_EQ(b.targets[prompt.size() - 1], answer[0]);
  EXPECT_EQ(b.targets[prompt.size() - 2], -1);

  std::ofstream(dir / "bad.jsonl") << "{\"prompt\": \"x\", \"response\": \"y\"}\n{\"prompt\": 3}\n";
  auto bad = parse(dir, "data = \"bad.jsonl\"\nsteps = 1\noutput = \"o\"\n");
  ASSERT_TRUE(bad.ok());
  auto refused = finetune::load_examples(bad->finetune, tok, 1024);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find((dir / "bad.jsonl").string() + ":2: expected string fields"), std::string::npos)
      << refused.message();

  // A corpus slice: whole lines around the byte range, nothing outside it.
  {
    std::ofstream corpus(dir / "corpus.txt");
    for (int i = 0; i < 10; ++i) corpus << "line " << i << " of the corpus\n";  // 21 bytes a line
  }
  auto slice = parse(dir, "corpus = \"corpus.txt\"\ncorpus_bytes = [45, 70]\nsteps = 1\noutput = \"o\"\n");
  ASSERT_TRUE(slice.ok()) << slice.message();
  auto sliced = finetune::load_examples(slice->finetune, tok, 1024);
  ASSERT_TRUE(sliced.ok()) << sliced.message();
  ASSERT_EQ(sliced->size(), 1u);
  const std::string text = tok.decode((*sliced)[0].tokens);
  EXPECT_NE(text.find("line 2 of the corpus\nline 3 of the corpus\n"), std::string::npos) << text;
  EXPECT_EQ(text.find("line 1 "), std::string::npos) << text;
  EXPECT_EQ(text.find("line 4 "), std::string::npos) << text;
  auto far = parse(dir, "corpus = \"corpus.txt\"\ncorpus_bytes = [500, 600]\nsteps = 1\noutput = \"o\"\n");
  ASSERT_TRUE(far.ok());
  EXPECT_NE(finetune::load_examples(far->finetune, tok, 1024).message().find("begins at 500 but"), std::string::npos);

  // A datasets/ task: passkey prompts, the answer digits predicted.
  auto task = parse(dir, "steps = 1\nseq_len = 300\noutput = \"o\"\n[finetune.task]\ntype = \"passkey\"\nlengths = [256]\n"
                         "depths = [0.5]\nsamples = 3\n");
  ASSERT_TRUE(task.ok()) << task.message();
  auto task_examples = finetune::load_examples(task->finetune, tok, 1024, &summary);
  ASSERT_TRUE(task_examples.ok()) << task_examples.message();
  EXPECT_EQ(task_examples->size(), 3u);
  for (const auto& e : *task_examples) {
    const int64_t predicted = std::count(e.predict.begin(), e.predict.end(), uint8_t{1});
    EXPECT_GE(predicted, 2);
    EXPECT_LT(predicted, 12);
    EXPECT_EQ(e.predict.back(), 1);
  }
  // With room for the prompt but not the answer, an example is left out, not cut.
  auto tight = parse(dir, "steps = 1\nseq_len = 256\noutput = \"o\"\n[finetune.task]\ntype = \"passkey\"\n"
                          "lengths = [256]\ndepths = [0.5]\nsamples = 3\n");
  ASSERT_TRUE(tight.ok()) << tight.message();
  auto none = finetune::load_examples(tight->finetune, tok, 1024);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.message().find("3 longer than finetune.seq_len + 1 = 257 tokens"), std::string::npos)
      << none.message();
}

// One step of kBase at learning rate 0 (the adapters stay as initialized)
// with `keys` added, into its own output folder: its report.
Result<finetune::FinetuneReport> first_step(const fs::path& dir, const std::string& keys, const std::string& out) {
  std::string base = kBase;
  base.replace(base.find("lr = 0.01"), 9, "lr = 0");
  auto config = parse(dir, base + "steps = 1\n" + keys);
  if (!config.ok()) return config.error();
  config->finetune.output = (dir / out).string();
  return finetune::run_finetune(*config, {});
}

// The early-exit objective (CALM): every layer's exit in the loss, weighted by
// layer index; with a learning rate of 0 the first step's loss is that
// weighted sum of each exit's loss, which an explicit exit_weights list gives
// too, and which differs from the last layer's alone.
TEST(Finetune, TheExitObjectiveWeighsEveryLayersExit) {
  const fs::path dir = make_dir("exits");
  auto first_loss = [&](const std::string& keys, const std::string& out) -> double {
    auto report = first_step(dir, keys, out);
    EXPECT_TRUE(report.ok()) << keys << ": " << report.message();
    return report.ok() ? report->final_loss : 0.0;
  };
  const double plain = first_loss("", "plain"), calm = first_loss("exit_loss = \"calm\"\n", "calm");
  const double listed = first_loss("exit_weights = [0.3333333333, 0.6666666667]\n", "listed");
  const double last_only = first_loss("exit_weights = [0, 1]\n", "last");
  EXPECT_EQ(last_only, plain);
  EXPECT_NEAR(listed, calm, 1e-6 * calm);
  EXPECT_GT(std::abs(calm - plain), 1e-3 * plain) << "the first layer's exit is not in the loss";
}

// SkipDecode's schedule in the forward: a budget of every layer changes
// nothing; a budget of one layer (the warm-up layer) after the first target
// changes the loss; bad schedules are refused naming the key.
TEST(Finetune, SkipDecodesScheduleRunsInTheForward) {
  const fs::path dir = make_dir("skips");
  auto first = [&](const std::string& keys, const std::string& out) { return first_step(dir, keys, out); };
  auto plain = first("", "plain"), all = first("skip_max_exit = 2\nskip_min_exit = 2\n", "all");
  auto one = first("skip_max_exit = 2\nskip_min_exit = 1\nskip_schedule_length = 4\n", "one");
  ASSERT_TRUE(plain.ok() && all.ok() && one.ok()) << plain.message() << all.message() << one.message();
  EXPECT_EQ(all->final_loss, plain->final_loss);
  EXPECT_GT(std::abs(one->final_loss - plain->final_loss), 1e-3 * plain->final_loss);
  for (const auto& [keys, expected] :
       {std::pair{std::string("skip_min_exit = 3\n"), std::string("finetune.skip_min_exit: 3 is past the model's 2 layers")},
        std::pair{std::string("skip_max_exit = 1\nskip_min_exit = 2\n"),
                  std::string("finetune.skip_min_exit: 2 layers exceed skip_max_exit's 1")},
        std::pair{std::string("skip_min_exit = 1\nskip_warmup_layers = 2\n"),
                  std::string("finetune.skip_warmup_layers: 2 exceeds skip_min_exit's 1 layers")}}) {
    auto bad = first(keys, "bad");
    ASSERT_FALSE(bad.ok()) << keys;
    EXPECT_NE(bad.message().find(expected), std::string::npos) << bad.message();
  }
}

TEST(Finetune, BadConfigsAndDataAreRefusedNamingTheKey) {
  const fs::path dir = make_dir("bad");
  auto message = [&](const std::string& keys) {
    auto c = parse(dir, keys);
    EXPECT_FALSE(c.ok()) << keys;
    return c.ok() ? std::string() : c.message();
  };
  EXPECT_NE(message("data = \"train.txt\"\noutput = \"o\"\n").find("finetune.steps: missing"), std::string::npos);
  EXPECT_NE(message("data = \"train.txt\"\nsteps = 2\n").find("finetune.output: missing"), std::string::npos);
  EXPECT_NE(message("data = \"nowhere.txt\"\nsteps = 2\noutput = \"o\"\n").find("finetune.data: file or folder not "
                                                                               "found"),
            std::string::npos);
  const std::string targets = message("data = \"train.txt\"\nsteps = 2\noutput = \"o\"\ntargets = [\"qq_proj\"]\n");
  EXPECT_NE(targets.find("finetune.targets: \"qq_proj\" is not a projection"), std::string::npos) << targets;
  EXPECT_NE(targets.find("q_proj, k_proj"), std::string::npos);
  EXPECT_NE(message("data = \"train.txt\"\nsteps = 2\noutput = \"o\"\nquant = \"nf3\"\n").find("finetune.quant"),
            std::string::npos);
  EXPECT_NE(message("data = \"train.txt\"\nsteps = 2\noutput = \"o\"\nbackend = \"tpu\"\n").find("finetune.backend"),
            std::string::npos);
  EXPECT_NE(message("data = \"train.txt\"\nsteps = 2\noutput = \"o\"\nexit_loss = \"calm\"\nexit_weights = [1, 1]\n")
                .find("finetune.exit_weights: set either exit_weights or exit_loss, not both"),
            std::string::npos);
  EXPECT_NE(message("data = \"train.txt\"\nsteps = 2\noutput = \"o\"\nexit_weights = [-1, 1]\n").find("finetune.exit_weights"),
            std::string::npos);
  EXPECT_NE(message("data = \"train.txt\"\nsteps = 2\noutput = \"o\"\nbogus = 1\n").find("finetune.bogus: unknown key"),
            std::string::npos);
  EXPECT_NE(message("steps = 2\noutput = \"o\"\n").find("finetune.data: missing"), std::string::npos);
  EXPECT_NE(message("data = \"train.txt\"\nsteps = 2\nwarmup_steps = 3\noutput = \"o\"\n").find("finetune.warmup_steps"),
            std::string::npos);

  // Problems that need the model or the data: refused before any training.
  auto run_message = [&](const std::string& keys) {
    auto c = parse(dir, keys);
    EXPECT_TRUE(c.ok()) << c.message();
    auto r = finetune::run_finetune(*c, {});
    EXPECT_FALSE(r.ok()) << keys;
    return r.ok() ? std::string() : r.message();
  };
  EXPECT_NE(run_message("data = \"train.txt\"\nsteps = 2\noutput = \"o\"\nseq_len = 4096\n")
                .find("finetune.seq_len: 4096 exceeds the model's context of 1024"),
            std::string::npos);
  EXPECT_NE(run_message("data = \"train.txt\"\nsteps = 2\noutput = \"o\"\nlayers = [0, 7]\n")
                .find("finetune.layers: layer 7 is outside the model's 2 layers"),
            std::string::npos);
  std::ofstream(dir / "empty.txt") << "";
  EXPECT_NE(run_message("data = \"empty.txt\"\nsteps = 2\noutput = \"o\"\n").find("empty.txt: no training examples"),
            std::string::npos);
  EXPECT_NE(run_message("data = \"train.txt\"\nsteps = 2\noutput = \"o\"\nexit_weights = [1]\n")
                .find("finetune.exit_weights: 1 weights for the model's 2 layers"),
            std::string::npos);
  EXPECT_NE(run_message("data = \"train.txt\"\nsteps = 2\noutput = \"o\"\nexit_weights = [0, 0]\n")
                .find("finetune.exit_weights: every weight is 0"),
            std::string::npos);
  // The CUDA graph without a GPU (or without the CUDA backend): refused before any training.
  if (!fs::exists("/dev/nvidia0")) {
    EXPECT_NE(run_message("data = \"train.txt\"\nsteps = 2\noutput = \"cuda\"\nbackend = \"cuda\"\n").find("CUDA"),
              std::string::npos);
  }
  fs::create_directories(dir / "taken");
  std::ofstream(dir / "taken" / "adapter_config.json") << "{}";
  EXPECT_NE(run_message("data = \"train.txt\"\nsteps = 2\noutput = \"taken\"\n").find("already holds files"),
            std::string::npos);
  EXPECT_EQ(read_file(dir / "taken" / "adapter_config.json"), "{}");
}

}  // namespace test_finetune
}  // namespace inferlab
