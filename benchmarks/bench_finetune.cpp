// Fine-tuning cost (issue 21): one forward + backward of a batch through the
// training graph (finetune/lora_graph.h), per setting: LoRA on the float32
// base or QLoRA on a 4-bit base, adapters on q,v or on every projection, with
// and without layer checkpointing. Reports the median step time, training
// tokens/s, the graph's peak kept activations and its base weight bytes;
// settings alternate round by round. CPU, or the CUDA graph (--backend cuda),
// on the model or on a synthetic model at a real shape (--synthetic PRESET
// --layers N: written to a temporary file first).
//   bench_finetune --model smollm2-135m [--batch 4] [--seq-len 256] [--ranks 8,64] [--targets q,v|all|both]
//                  [--rounds 3] [--backend cpu|cuda] [--synthetic llama2-7b --layers 4]
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>

#include "bench_support.h"
#include "engine/device.h"
#include "finetune/lora_graph.h"
#include "model/model.h"
#include "model/synthetic_model.h"

using namespace inferlab;

namespace {

struct Setting {
  std::string name;
  finetune::GraphOptions options;
  int32_t rank = 8;
  std::vector<int> slots;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fine-tuning step cost: forward + backward through the training graph"};
  std::string model_name = "smollm2-135m";
  int64_t batch = 4, seq_len = 256, rounds = 3, threads = 0;
  std::vector<int32_t> ranks = {8, 64};
  std::string backend = "cpu", synthetic, targets_choice = "both";
  int32_t layers = 0;
  app.add_option("--model", model_name, "model short name or .gguf path")->capture_default_str();
  app.add_option("--backend", backend, "where the graph runs")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--synthetic", synthetic, "a synthetic model at this preset's shape instead of --model")
      ->check(CLI::IsMember(synthetic_preset_names()));
  app.add_option("--layers", layers, "the synthetic model's first layers only (0: all)")->check(CLI::NonNegativeNumber);
  app.add_option("--targets", targets_choice, "adapters on q,v, on every projection, or both settings")
      ->check(CLI::IsMember({"q,v", "all", "both"}))
      ->capture_default_str();
  app.add_option("--batch", batch, "sequences per step")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seq-len", seq_len, "tokens per sequence")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--ranks", ranks, "adapter ranks")->delimiter(',')->capture_default_str();
  app.add_option("--rounds", rounds, "rounds (the median is reported)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("-t,--threads", threads, "threads (0: all cores)")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a log as it is measured (a capped run keeps them)
  if (threads > 0) omp_set_num_threads(int(threads));
  // Setup (writing and loading a model, quantizing and uploading each graph's
  // base) can take much of a capped run: each stage's elapsed time is printed
  // and flushed as it ends, so a run cut short still shows where time went.
  const auto start = bench::Clock::now();
  auto progress = [&](const std::string& what) {
    fmt::print("[{:.1f} s] {}\n", bench::since(start), what);
    std::fflush(stdout);
  };

  if (backend == "cuda" && cuda_device_count() == 0) {
    fmt::print(stderr, "bench_finetune: no CUDA GPU{}\n", cuda_compiled() ? "" : " (a build without CUDA)");
    return 1;
  }
  std::filesystem::path model_path;
  if (!synthetic.empty()) {
    auto spec = synthetic_preset(synthetic, layers);
    if (!spec) return fmt::print(stderr, "bench_finetune: {}\n", spec.message()), 1;
    model_path = std::filesystem::temp_directory_path() / fmt::format("bench_finetune_{}_{}.gguf", synthetic, layers);
    if (auto st = write_synthetic_model(*spec, model_path); !st)
      return fmt::print(stderr, "bench_finetune: {}\n", st.message()), 1;
    progress(fmt::format("synthetic model written to {}", model_path.string()));
    model_name = fmt::format("synthetic {} ({} layers)", synthetic, layers > 0 ? layers : spec->n_layers);
  } else {
    auto path = resolve_model(model_name);
    if (!path) {
      fmt::print(stderr, "bench_finetune: {}\n", path.message());
      return 1;
    }
    model_path = *path;
  }
  auto model = Model::load(model_path);
  if (!synthetic.empty()) std::filesystem::remove(model_path);
  if (!model) {
    fmt::print(stderr, "bench_finetune: {}\n", model.message());
    return 1;
  }
  progress("model loaded");
  const ModelConfig& c = (*model)->config();

  std::vector<Setting> settings;
  for (int32_t r : ranks) {
    for (const auto& [targets, slots] :
         std::vector<std::pair<std::string, std::vector<int>>>{{"q,v", {0, 2}}, {"all", {0, 1, 2, 3, 4, 5, 6}}}) {
      if (targets_choice != "both" && targets != targets_choice) continue;
      for (const std::string base : {"f32", "nf4+dq"}) {
        for (bool ckpt : {false, true}) {
          Setting s;
          s.name = fmt::format("r={} {} {}{}", r, targets, base, ckpt ? " ckpt" : "");
          s.rank = r;
          s.slots = slots;
          if (base != "f32") {
            s.options.base.format = WeightFormat::NF4;
            s.options.base.double_quant = true;
          }
          s.options.checkpoint_layers = ckpt;
          s.options.cuda = backend == "cuda";
          settings.push_back(s);
        }
      }
    }
  }

  finetune::Batch b;
  b.sequences = batch;
  b.seq_len = seq_len;
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<int32_t> tok(0, c.n_vocab - 1);
  for (int64_t i = 0; i < batch * seq_len; ++i) b.tokens.push_back(tok(rng));
  b.targets.assign(b.tokens.size(), -1);
  for (size_t i = 0; i + 1 < b.tokens.size(); ++i)
    if ((int64_t(i) + 1) % seq_len != 0) b.targets[i] = b.tokens[i + 1];

  struct State {
    std::unique_ptr<finetune::LoraGraph> graph;
    finetune::AdapterSet set;
    finetune::AdapterGrads grads;
    std::vector<double> ms;
  };
  std::vector<State> states;
  for (const Setting& s : settings) {
    auto g = finetune::LoraGraph::create(*model, s.options);
    if (!g) {
      fmt::print(stderr, "bench_finetune: {}\n", g.message());
      return 1;
    }
    finetune::AdapterInit init;
    init.rank = s.rank;
    init.alpha = 16;
    init.slots = s.slots;
    auto set = finetune::init_adapters(c, init);
    if (!set) {
      fmt::print(stderr, "bench_finetune: {}\n", set.message());
      return 1;
    }
    for (auto& t : set->adapters) std::fill(t.b.begin(), t.b.end(), 0.01f);
    auto grads = finetune::AdapterGrads::like(*set);
    states.push_back({std::move(*g), std::move(*set), std::move(grads), {}});
    progress(fmt::format("graph {} created", s.name));
  }
  fmt::print("{}: {} x {} tokens per step, backend {}, {} threads\n", model_name, batch, seq_len, backend,
             omp_get_max_threads());
  for (int64_t round = 0; round < rounds; ++round) {
    for (State& s : states) {
      const auto t0 = bench::Clock::now();
      auto r = s.graph->forward_backward(b, s.set, s.grads, 1e-3f);
      if (!r) {
        fmt::print(stderr, "bench_finetune: {}\n", r.message());
        return 1;
      }
      s.ms.push_back(bench::since(t0) * 1e3);
    }
    progress(fmt::format("round {} of {} done", round + 1, rounds));
  }
  fmt::print("{:<24} {:>10} {:>10} {:>14} {:>12}\n", "setting", "ms/step", "tokens/s", "activations", "base");
  for (size_t i = 0; i < states.size(); ++i) {
    auto& s = states[i];
    std::sort(s.ms.begin(), s.ms.end());
    const double median = s.ms[s.ms.size() / 2];
    const auto mem = s.graph->memory();
    fmt::print("{:<24} {:>10.0f} {:>10.0f} {:>10.0f} MiB {:>8.0f} MiB\n", settings[i].name, median,
               double(batch * seq_len) / (median / 1e3), double(mem.peak_activation_bytes) / 1048576.0,
               double(mem.base_weight_bytes) / 1048576.0);
  }
  return 0;
}
