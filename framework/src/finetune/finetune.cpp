#include "finetune/finetune.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <omp.h>
#include <sys/resource.h>

#include <chrono>
#include <csignal>
#include <numeric>
#include <cstdlib>
#include <random>
#include <sstream>

#include "engine/engine.h"
#include "experiment/runner.h"
#include "finetune/data.h"
#include "formats/gguf_adapter.h"
#include "datasets/tasks.h"
#include "inferlab/skipdecode_schedule.h"
#include "inferlab/train.h"
#include "model/model.h"
#include "results/database.h"

namespace inferlab::finetune {

namespace fs = std::filesystem;

namespace {

int64_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return int64_t(u.ru_maxrss) * 1024;
}

std::string format_duration(double seconds) {
  const auto s = int64_t(seconds);
  if (s >= 3600) return fmt::format("{}h{:02}m", s / 3600, (s / 60) % 60);
  if (s >= 60) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t z = a * 0x9e3779b97f4a7c15ull + b + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Everything that changes the trained adapter, as canonical JSON (sorted keys,
// floats in their shortest text, data files by content).
Result<std::string> canonical_json(const FinetuneConfig& c, const std::string& model_checksum) {
  const FinetuneSection& f = c.finetune;
  auto real = [](double x) { return fmt::format("{}", x); };
  nlohmann::json data = nlohmann::json::array();
  for (const auto& path : f.data) {
    auto digest = sha256_file(path);
    if (!digest) return digest.error();
    data.push_back("sha256:" + *digest);
  }
  nlohmann::json corpus = nullptr;
  if (!f.corpus.empty()) {
    auto path = resolve_corpus(f.corpus);
    if (!path) return Error{"finetune.corpus: " + path.message()};
    auto digest = sha256_file(*path);
    if (!digest) return digest.error();
    corpus = {{"sha256", *digest}, {"bytes", f.corpus_bytes}};
  }
  nlohmann::json task = nullptr;
  if (f.task) {
    task = nlohmann::json::object();
    task["type"] = f.task->type;
    for (const auto& [name, values] : f.task->params.all()) {
      nlohmann::json list = nlohmann::json::array();
      for (const auto& v : values) list.push_back(param_value_to_string(v));
      task[name] = list;
    }
  }
  nlohmann::json j = {
      {"model", model_checksum},
      {"data", data},
      {"data_format", f.data_format},
      {"corpus", corpus},
      {"task", task},
      {"targets", f.targets},
      {"layers", f.layers},
      {"r", f.r},
      {"alpha", real(f.alpha)},
      {"rslora", f.rslora},
      {"dropout", real(f.dropout)},
      {"quant", f.quant},
      {"double_quant", f.double_quant},
      {"block_size", f.block_size},
      {"lr", real(f.lr)},
      {"weight_decay", real(f.weight_decay)},
      {"beta1", real(f.beta1)},
      {"beta2", real(f.beta2)},
      {"eps", real(f.eps)},
      {"max_grad_norm", real(f.max_grad_norm)},
      {"schedule", f.schedule},
      {"warmup_steps", f.warmup_steps},
      {"steps", f.steps},
      {"batch", f.batch},
      {"grad_accum", f.grad_accum},
      {"seq_len", f.seq_len},
      {"seed", f.seed},
      {"checkpoint_layers", f.checkpoint_layers},
      {"eval_fraction", real(f.eval_fraction)}};
  if (f.backend != "cpu") j["backend"] = f.backend;  // absent for the CPU, so earlier checkpoints still resume
  if (f.exit_loss != "none") j["exit_loss"] = f.exit_loss;  // likewise absent without an exit objective
  if (!f.exit_weights.empty()) j["exit_weights"] = f.exit_weights;
  if (f.skip_max_exit > 0 || f.skip_min_exit > 0)
    j["skip"] = {f.skip_max_exit, f.skip_min_exit, f.skip_warmup_layers, f.skip_schedule_length};
  return j.dump();
}

// The [finetune] skip_* keys as a SkipDecode schedule over the model's layers
// (n_layers 0: none), checked as the skipdecode plugin checks its parameters.
Result<SkipDecodeSchedule> skip_schedule(const FinetuneSection& f, const ModelConfig& mc) {
  if (f.skip_max_exit == 0 && f.skip_min_exit == 0) return SkipDecodeSchedule{};
  const int64_t n = mc.n_layers;
  for (const auto& [key, v] : {std::pair{"skip_max_exit", f.skip_max_exit}, std::pair{"skip_min_exit", f.skip_min_exit},
                               std::pair{"skip_warmup_layers", f.skip_warmup_layers}})
    if (v > n) return Error{fmt::format("finetune.{}: {} is past the model's {} layers", key, v, n)};
  const int64_t max_exit = f.skip_max_exit == 0 ? n : f.skip_max_exit, min_exit = f.skip_min_exit == 0 ? n : f.skip_min_exit;
  if (min_exit > max_exit)
    return Error{fmt::format("finetune.skip_min_exit: {} layers exceed skip_max_exit's {}", min_exit, max_exit)};
  if (f.skip_warmup_layers > min_exit)
    return Error{fmt::format("finetune.skip_warmup_layers: {} exceeds skip_min_exit's {} layers (every token runs its "
                             "warm-up layers)",
                             f.skip_warmup_layers, min_exit)};
  return SkipDecodeSchedule{int32_t(n), int32_t(max_exit), int32_t(min_exit), int32_t(f.skip_warmup_layers),
                            int32_t(f.skip_schedule_length)};
}

// A batch with the schedule's skip flags: in each sequence, positions up to
// its first target run every layer (the prompt, as generation runs it), and
// the position g + 1 after it runs budget(g) layers, as the plugin's decode
// step g does.
Batch scheduled(Batch b, const SkipDecodeSchedule& schedule) {
  if (schedule.n_layers == 0) return b;
  const int64_t L = schedule.n_layers;
  b.skip.assign(size_t(b.sequences * b.seq_len * L), 0);
  for (int64_t s = 0; s < b.sequences; ++s) {
    int64_t first = -1;
    for (int64_t t = 0; t < b.seq_len && first < 0; ++t)
      if (b.targets[size_t(s * b.seq_len + t)] >= 0) first = t;
    if (first < 0) continue;
    for (int64_t t = first + 1; t < b.seq_len; ++t) {
      const int32_t budget = schedule.budget(t - first - 1);
      for (int32_t l = 0; l < L; ++l)
        b.skip[size_t((s * b.seq_len + t) * L + l)] = schedule.runs(l, budget) ? 0 : 1;
    }
  }
  return b;
}

// The order examples are drawn in: a seeded shuffle per epoch.
struct DataOrder {
  std::mt19937_64 rng;
  std::vector<int64_t> pool;   // the training examples' indices
  std::vector<int64_t> order;  // this epoch's order
  int64_t position = 0;
  int64_t epoch = 0;

  void start_epoch() {
    order = pool;
    train::shuffle(order, rng);
    position = 0;
    ++epoch;
  }
  std::vector<int64_t> next(int64_t count) {
    std::vector<int64_t> out;
    while (int64_t(out.size()) < count) {
      if (position >= int64_t(order.size())) start_epoch();
      out.push_back(order[size_t(position++)]);
    }
    return out;
  }
};

std::string rng_text(const std::mt19937_64& rng) {
  std::ostringstream s;
  s << rng;
  return s.str();
}

struct Checkpoint {
  int64_t step = 0;
  AdapterSet adapters;
  int64_t adam_steps = 0;
  std::vector<std::vector<float>> m, v;
  std::string order_rng;
  std::vector<int64_t> order;
  int64_t position = 0, epoch = 0;
  double seconds = 0;
  int64_t tokens = 0;
};

Status save_checkpoint(const fs::path& path, const std::string& hash, const Checkpoint& c) {
  train::StateFile f;
  f.put_text("hash", hash);
  f.put_int("step", c.step);
  f.put_int("adapters", int64_t(c.adapters.adapters.size()));
  for (size_t i = 0; i < c.adapters.adapters.size(); ++i) {
    f.put_floats(fmt::format("a.{}", i), c.adapters.adapters[i].a);
    f.put_floats(fmt::format("b.{}", i), c.adapters.adapters[i].b);
  }
  f.put_int("adam.steps", c.adam_steps);
  f.put_int("adam.tensors", int64_t(c.m.size()));
  for (size_t i = 0; i < c.m.size(); ++i) {
    f.put_floats(fmt::format("adam.m.{}", i), c.m[i]);
    f.put_floats(fmt::format("adam.v.{}", i), c.v[i]);
  }
  f.put_text("order.rng", c.order_rng);
  f.put_text("order", fmt::format("{}", fmt::join(c.order, " ")));
  f.put_int("order.position", c.position);
  f.put_int("order.epoch", c.epoch);
  f.put_text("seconds", fmt::format("{}", c.seconds));
  f.put_int("tokens", c.tokens);
  return f.save(path.string());
}

Result<Checkpoint> load_checkpoint(const fs::path& path, const std::string& hash, AdapterSet shape) {
  auto f = train::StateFile::load(path.string());
  if (!f) return f.error();
  auto fail = [&](const std::string& what) -> Error { return Error{fmt::format("{}: {}", path.string(), what)}; };
  auto stored_hash = f->text("hash");
  if (!stored_hash) return fail(stored_hash.message());
  if (*stored_hash != hash)
    return fail(fmt::format("this checkpoint belongs to another fine-tuning config (hash {} vs {}): remove it, or "
                            "pass --restart to start over",
                            stored_hash->substr(0, 12), hash.substr(0, 12)));
  Checkpoint c;
  auto get_int = [&](const std::string& name, int64_t& into) -> Status {
    auto v = f->integer(name);
    if (!v) return fail(v.message());
    into = *v;
    return ok_status();
  };
  int64_t count = 0, tensors = 0;
  for (auto [name, into] : {std::pair<const char*, int64_t*>{"step", &c.step}, {"adapters", &count},
                            {"adam.steps", &c.adam_steps}, {"adam.tensors", &tensors},
                            {"order.position", &c.position}, {"order.epoch", &c.epoch}, {"tokens", &c.tokens}})
    if (auto st = get_int(name, *into); !st) return st.error();
  if (count != int64_t(shape.adapters.size()))
    return fail(fmt::format("{} adapters, the config makes {}", count, shape.adapters.size()));
  c.adapters = std::move(shape);
  for (size_t i = 0; i < c.adapters.adapters.size(); ++i) {
    auto a = f->floats(fmt::format("a.{}", i)), b = f->floats(fmt::format("b.{}", i));
    if (!a || !b) return fail(!a ? a.message() : b.message());
    if (a->size() != c.adapters.adapters[i].a.size() || b->size() != c.adapters.adapters[i].b.size())
      return fail(fmt::format("adapter {} has other sizes than the config makes", i));
    c.adapters.adapters[i].a = std::move(*a);
    c.adapters.adapters[i].b = std::move(*b);
  }
  for (int64_t i = 0; i < tensors; ++i) {
    auto m = f->floats(fmt::format("adam.m.{}", i)), v = f->floats(fmt::format("adam.v.{}", i));
    if (!m || !v) return fail(!m ? m.message() : v.message());
    c.m.push_back(std::move(*m));
    c.v.push_back(std::move(*v));
  }
  auto rng = f->text("order.rng"), order = f->text("order"), seconds = f->text("seconds");
  if (!rng || !order || !seconds) return fail("missing the data order or clock");
  c.order_rng = *rng;
  std::istringstream in(*order);
  for (int64_t x; in >> x;) c.order.push_back(x);
  c.seconds = std::strtod(seconds->c_str(), nullptr);
  return c;
}

std::vector<std::span<float>> grad_spans(AdapterGrads& g) {
  std::vector<std::span<float>> out;
  for (size_t i = 0; i < g.a.size(); ++i) {
    out.emplace_back(g.a[i]);
    out.emplace_back(g.b[i]);
  }
  return out;
}

std::vector<train::Parameter> parameters(AdapterSet& set, const AdapterGrads& g) {
  std::vector<train::Parameter> out;
  for (size_t i = 0; i < set.adapters.size(); ++i) {
    out.push_back({set.adapters[i].a, g.a[i]});
    out.push_back({set.adapters[i].b, g.b[i]});
  }
  return out;
}

}  // namespace

fs::path checkpoint_path(const FinetuneConfig& config) {
  const fs::path out(config.finetune.output);
  return out.parent_path() / (out.filename().string() + ".checkpoint");
}

Result<FinetuneReport> run_finetune(const FinetuneConfig& config, const FinetuneOptions& options) {
  const FinetuneSection& f = config.finetune;
  std::ostream* log = options.progress;
  auto say = [&](const std::string& line) {
    if (log) *log << line << std::endl;
  };

  auto path = resolve_model(config.model.name);
  if (!path) return Error{"model.name: " + path.message()};
  auto model = Model::load(*path);
  if (!model) return model.error();
  const ModelConfig& mc = (*model)->config();
  const int64_t threads = f.threads > 0 ? f.threads : config.model.threads;
  if (threads > 0) omp_set_num_threads(int(threads));

  if (f.seq_len > mc.context_length)
    return Error{fmt::format("finetune.seq_len: {} exceeds the model's context of {} tokens", f.seq_len,
                             mc.context_length)};
  for (int64_t l : f.layers)
    if (l >= mc.n_layers)
      return Error{fmt::format("finetune.layers: layer {} is outside the model's {} layers", l, mc.n_layers)};

  auto checksum = (*model)->checksum();
  auto json = canonical_json(config, checksum);
  if (!json) return json.error();
  FinetuneReport report;
  report.hash = sha256_hex(*json);
  report.steps = f.steps;
  report.output = f.output;

  const fs::path ckpt = checkpoint_path(config);
  std::error_code ec;
  fs::create_directories(ckpt.parent_path(), ec);
  if (ec) return Error{fmt::format("finetune.output: cannot create {}: {}", ckpt.parent_path().string(), ec.message())};
  if (options.restart) fs::remove(ckpt, ec);
  const bool resuming = fs::exists(ckpt, ec);
  // An output folder that holds files is refused before any work, unless this
  // run's own checkpoint says the folder is ours (killed after writing it).
  if (!resuming && !f.overwrite && fs::exists(f.output, ec) && !fs::is_empty(f.output, ec))
    return Error{fmt::format("finetune.output: {} already holds files (another adapter?); choose another folder or "
                             "set overwrite = true",
                             f.output)};

  DataSummary data;
  auto examples = load_examples(f, (*model)->tokenizer(), mc.context_length, &data);
  if (!examples) return examples.error();

  std::vector<int64_t> all(examples->size());
  std::iota(all.begin(), all.end(), int64_t{0});
  std::mt19937_64 split_rng(uint64_t(f.seed));
  train::shuffle(all, split_rng);
  int64_t n_eval = std::llround(f.eval_fraction * double(all.size()));
  if (f.eval_fraction > 0 && n_eval == 0) n_eval = 1;
  if (n_eval >= int64_t(all.size()))
    return Error{fmt::format("finetune.eval_fraction: {} of {} examples leaves none to train on", f.eval_fraction,
                             all.size())};
  std::vector<int64_t> eval_rows(all.begin(), all.begin() + n_eval), train_rows(all.begin() + n_eval, all.end());
  std::sort(eval_rows.begin(), eval_rows.end());
  std::sort(train_rows.begin(), train_rows.end());

  AdapterInit init;
  init.rank = int32_t(f.r);
  init.alpha = f.alpha;
  init.rslora = f.rslora;
  for (const auto& t : f.targets)
    init.slots.push_back(int(std::find(peft::kProjectionModules.begin(), peft::kProjectionModules.end(), t) -
                             peft::kProjectionModules.begin()));
  for (int64_t l : f.layers) init.layers.push_back(int32_t(l));
  init.seed = uint64_t(f.seed);
  auto adapters = init_adapters(mc, init);
  if (!adapters) return Error{"finetune: " + adapters.message()};
  report.trainable_parameters = adapters->parameter_count();

  GraphOptions go;
  if (f.quant != "none") {
    go.base.format = f.quant == "nf4" ? WeightFormat::NF4 : f.quant == "fp4" ? WeightFormat::FP4 : WeightFormat::Int4;
    go.base.block_size = int32_t(f.block_size);
    go.base.double_quant = f.double_quant;
  }
  go.checkpoint_layers = f.checkpoint_layers;
  go.dropout = float(f.dropout);
  go.cuda = f.backend == "cuda";
  auto skip = skip_schedule(f, mc);
  if (!skip) return skip.error();
  if (!f.exit_weights.empty()) {
    if (int64_t(f.exit_weights.size()) != mc.n_layers)
      return Error{fmt::format("finetune.exit_weights: {} weights for the model's {} layers", f.exit_weights.size(),
                               mc.n_layers)};
    if (std::all_of(f.exit_weights.begin(), f.exit_weights.end(), [](double w) { return w == 0; }))
      return Error{"finetune.exit_weights: every weight is 0: no loss to train on"};
    go.exit_weights.assign(f.exit_weights.begin(), f.exit_weights.end());
  } else if (f.exit_loss == "calm") {  // CALM: w_l proportional to l (1-based), summing to 1
    const double total = double(mc.n_layers) * double(mc.n_layers + 1) / 2.0;
    for (int32_t l = 0; l < mc.n_layers; ++l) go.exit_weights.push_back(float(double(l + 1) / total));
  }
  auto graph = LoraGraph::create(*model, go);
  if (!graph) return graph.error();
  // QLoRA: the graph computes through its 4-bit copy of the projections, so
  // their float32 weights leave the process (the memory the recipe saves).
  if (f.quant != "none") (*model)->release_layer_projections();

  train::AdamWOptions ao;
  ao.lr = f.lr, ao.beta1 = f.beta1, ao.beta2 = f.beta2, ao.eps = f.eps, ao.weight_decay = f.weight_decay;
  auto adam = train::AdamW::create(ao);
  if (!adam) return Error{"finetune: " + adam.message()};
  train::Schedule schedule;
  schedule.kind = f.schedule == "cosine"   ? train::ScheduleKind::kCosine
                  : f.schedule == "linear" ? train::ScheduleKind::kLinear
                                           : train::ScheduleKind::kConstant;
  schedule.warmup = f.warmup_steps;
  schedule.total = f.steps;

  DataOrder order{std::mt19937_64(mix(uint64_t(f.seed), 1)), train_rows, {}, 0, 0};
  AdapterSet set = std::move(*adapters);
  int64_t start = 0, tokens_total = 0;
  double seconds_before = 0;
  if (resuming) {
    auto c = load_checkpoint(ckpt, report.hash, set);
    if (!c) return c.error();
    set = std::move(c->adapters);
    if (auto st = adam->restore(c->adam_steps, std::move(c->m), std::move(c->v)); !st) return st.error();
    std::istringstream(c->order_rng) >> order.rng;
    order.order = std::move(c->order);
    order.position = c->position;
    order.epoch = c->epoch;
    start = c->step;
    seconds_before = c->seconds;
    tokens_total = c->tokens;
    say(fmt::format("finetune {}: resuming from step {} of {} ({})", f.name, start, f.steps, ckpt.string()));
  }
  report.first_step = start + 1;

  std::optional<ResultsDb> db;
  int64_t db_id = 0;
  if (!options.db.empty()) {
    auto opened = ResultsDb::open(options.db);
    if (!opened) return opened.error();
    db.emplace(std::move(*opened));
    auto id = db->begin_finetune({report.hash, f.name, *json, config.model.name, checksum, f.output,
                                  build_revision()});
    if (!id) return id.error();
    db_id = *id;
  }
  auto fail_run = [&](const Error& e) -> Error {
    if (db) (void)db->finish_finetune(db_id, false, e.message, "");
    return e;
  };

  auto eval_loss = [&]() -> Result<double> {
    double sum = 0;
    int64_t count = 0;
    for (size_t begin = 0; begin < eval_rows.size(); begin += size_t(f.batch)) {
      const std::vector<int64_t> which(eval_rows.begin() + begin,
                                       eval_rows.begin() + std::min(eval_rows.size(), begin + size_t(f.batch)));
      auto r = (*graph)->loss(scheduled(make_batch(*examples, which), *skip), set);
      if (!r) return r.error();
      sum += r->loss_sum;
      count += r->tokens;
    }
    return count > 0 ? sum / double(count) : 0.0;
  };

  say(fmt::format("finetune {}: {} on {} ({} examples, {} tokens, {} predicted{}; {} held out); {} trainable "
                  "parameters (r {}, {}), {} steps of {} x {} sequences",
                  f.name, f.quant == "none" ? "LoRA" : "QLoRA (" + f.quant + ")", config.model.name, data.examples,
                  data.tokens, data.targets,
                  (data.truncated ? fmt::format(", {} cut to {} tokens", data.truncated, f.seq_len + 1) : "") +
                      (data.dropped ? fmt::format(", {} too long for seq_len, left out", data.dropped) : ""),
                  eval_rows.size(), report.trainable_parameters, f.r, fmt::join(f.targets, ","), f.steps,
                  f.grad_accum, f.batch));
  if (!eval_rows.empty() && start == 0) {
    auto e = eval_loss();
    if (!e) return fail_run(e.error());
    report.eval_loss_before = *e;
    say(fmt::format("  held-out loss before training {:.4f}", *e));
  }

  const char* kill_env = std::getenv("INFERLAB_FINETUNE_KILL_AFTER_STEP");  // for the resume test: a real SIGKILL
  const int64_t kill_after = kill_env ? std::atoll(kill_env) : -1;
  auto grads = AdapterGrads::like(set);
  std::vector<FinetuneStep> pending;
  double session_seconds = 0;
  int64_t session_tokens = 0;
  for (int64_t step = start + 1; step <= f.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const double lr = train::scheduled_lr(f.lr, schedule, step - 1);
    adam->set_lr(lr);
    std::vector<Batch> micro;
    int64_t targets = 0, inputs = 0;
    for (int64_t k = 0; k < f.grad_accum; ++k) {
      const auto which = order.next(f.batch);
      micro.push_back(scheduled(make_batch(*examples, which), *skip));
      for (int32_t t : micro.back().targets) targets += t >= 0;
      for (int64_t i : which) inputs += int64_t((*examples)[size_t(i)].tokens.size()) - 1;
    }
    grads.zero();
    double loss_sum = 0;
    for (size_t k = 0; k < micro.size(); ++k) {
      auto r = (*graph)->forward_backward(micro[k], set, grads, 1.0f / float(std::max<int64_t>(1, targets)),
                                          mix(mix(uint64_t(f.seed), uint64_t(step)), k));
      if (!r) return fail_run(r.error());
      loss_sum += r->loss_sum;
    }
    auto spans = grad_spans(grads);
    const double norm = train::clip_grad_norm(spans, f.max_grad_norm);
    if (auto st = adam->step(parameters(set, grads)); !st) return fail_run(st.error());
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    session_seconds += seconds;
    session_tokens += inputs;
    tokens_total += inputs;
    FinetuneStep rec{step, loss_sum / double(std::max<int64_t>(1, targets)), lr, norm, targets, seconds, {}};
    report.final_loss = rec.loss;
    if (!eval_rows.empty() && ((f.eval_every > 0 && step % f.eval_every == 0) || step == f.steps)) {
      auto e = eval_loss();
      if (!e) return fail_run(e.error());
      rec.eval_loss = *e;
      if (step == f.steps) report.eval_loss_after = *e;
    }
    pending.push_back(rec);
    if (step % f.log_every == 0 || step == f.steps || step == start + 1) {
      const double per_step = session_seconds / double(step - start);
      say(fmt::format("  step {}/{}  loss {:.4f}{}  lr {:.2e}  |g| {:.3f}  {:.0f} tok/s  ETA {}", step, f.steps,
                      rec.loss, rec.eval_loss ? fmt::format(" (held out {:.4f})", *rec.eval_loss) : "", lr, norm,
                      double(session_tokens) / std::max(1e-9, session_seconds),
                      format_duration(per_step * double(f.steps - step))));
    }
    if (step % f.checkpoint_every == 0 || step == f.steps) {
      // The curve first: a kill between the two replays these steps, which
      // then overwrite their rows with the same values.
      if (db) {
        if (auto st = db->record_finetune_steps(db_id, pending); !st) return fail_run(st.error());
        pending.clear();
      }
      Checkpoint c;
      c.step = step;
      c.adapters = set;
      c.adam_steps = adam->steps();
      for (size_t i = 0; i < adam->tensors(); ++i) {
        c.m.push_back(adam->m(i));
        c.v.push_back(adam->v(i));
      }
      c.order_rng = rng_text(order.rng);
      c.order = order.order;
      c.position = order.position;
      c.epoch = order.epoch;
      c.seconds = seconds_before + session_seconds;
      c.tokens = tokens_total;
      if (auto st = save_checkpoint(ckpt, report.hash, c); !st) return fail_run(st.error());
    }
    if (step == kill_after) std::raise(SIGKILL);
    if (step == options.stop_after_step && step < f.steps) {
      if (db && !pending.empty())
        if (auto st = db->record_finetune_steps(db_id, pending); !st) return fail_run(st.error());
      report.stopped = true;
      report.output.clear();
      return report;
    }
  }

  const ModelShape shape = model_shape(mc, mc.context_length);
  peft::WriteOptions wo;
  wo.use_rslora = f.rslora;
  wo.gguf_rows = !mc.rope_neox;
  wo.lora_dropout = f.dropout;
  wo.base_model = config.model.name;
  wo.overwrite = true;  // refused above unless allowed or ours
  if (auto st = peft::write_adapter(f.output, to_projection_adapters(set), shape, wo); !st)
    return fail_run(st.error());
  if (f.gguf)
    if (auto st = gguf_adapter::write_adapter(fs::path(f.output) / "adapter_model.gguf", to_projection_adapters(set),
                                              mc.architecture);
        !st)
      return fail_run(st.error());
  fs::remove(ckpt, ec);

  report.tokens_per_second = double(session_tokens) / std::max(1e-9, session_seconds);
  report.memory = (*graph)->memory();
  report.peak_rss_bytes = peak_rss_bytes();
  const nlohmann::json summary = {
      {"final_loss", report.final_loss},
      {"eval_loss_before", report.eval_loss_before ? nlohmann::json(*report.eval_loss_before) : nlohmann::json()},
      {"eval_loss_after", report.eval_loss_after ? nlohmann::json(*report.eval_loss_after) : nlohmann::json()},
      {"tokens_per_second", report.tokens_per_second},
      {"trainable_parameters", report.trainable_parameters},
      {"base_weight_bytes", report.memory.base_weight_bytes},
      {"peak_activation_bytes", report.memory.peak_activation_bytes},
      {"peak_rss_bytes", report.peak_rss_bytes},
      {"resumed_from_step", start},
      {"threads", omp_get_max_threads()}};
  if (db)
    if (auto st = db->finish_finetune(db_id, true, "", summary.dump()); !st) return st.error();
  say(fmt::format("finetune {}: wrote {} (final loss {:.4f}{}; {:.0f} tok/s; peak RSS {:.0f} MiB, activations {:.0f} "
                  "MiB, base weights {:.0f} MiB)",
                  f.name, f.output, report.final_loss,
                  report.eval_loss_after ? fmt::format(", held out {:.4f}", *report.eval_loss_after) : "",
                  report.tokens_per_second, double(report.peak_rss_bytes) / 1048576.0,
                  double(report.memory.peak_activation_bytes) / 1048576.0,
                  double(report.memory.base_weight_bytes) / 1048576.0));
  return report;
}

}  // namespace inferlab::finetune
