#include "cli/commands.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "engine/engine.h"
#include "engine/generation.h"
#include "experiment/activation_store.h"
#include "experiment/calibration.h"
#include "gguf/gguf.h"
#include "model/hf_checkpoint.h"
#include "model/model.h"
#include "model/synthetic_model.h"
#include "plugins/plugin_host.h"
#include "tokenizer/chat_template.h"

namespace inferlab::cli {

namespace {

int g_exit_code = 0;

int fail(const std::string& message) {
  std::fprintf(stderr, "inferlab: %s\n", message.c_str());
  return 1;
}

struct EngineArgs {
  std::string model = "smollm2-135m";
  int32_t threads = 0;
  int32_t page_size = 16;
  int32_t max_context = 0;
  std::string backend = "cpu";
  std::string dtype = "f16";
  std::string weights = "f32";
  std::string kv_dtype = "auto";
  std::string adapter;
};

void add_engine_options(CLI::App* cmd, EngineArgs& args) {
  cmd->add_option("-m,--model", args.model, "model short name, .gguf path or checkpoint folder")->capture_default_str();
  cmd->add_option("--adapter", args.adapter,
                  "a LoRA adapter (PEFT folder or llama.cpp GGUF adapter) merged into the model's weights at load");
  cmd->add_option("-t,--threads", args.threads, "CPU threads (0: all cores)")->check(CLI::Range(0, 1 << 30));
  cmd->add_option("--page-size", args.page_size, "KV cache page size in tokens")
      ->check(CLI::Range(1, 65536))
      ->capture_default_str();
  cmd->add_option("--max-context", args.max_context, "context limit (0: the model's)")->check(CLI::Range(0, 1 << 30));
  cmd->add_option("--backend", args.backend, "cpu, cuda, or auto (CUDA when a GPU is present)")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}))
      ->capture_default_str();
  cmd->add_option("--dtype", args.dtype, "CUDA backend: weights and KV cache in f16 or bf16")
      ->check(CLI::IsMember({"f16", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--weights", args.weights,
                  "CPU backend: f32 (reference) or file (the model's quantized blocks, as llama.cpp computes)")
      ->check(CLI::IsMember({"f32", "file"}))
      ->capture_default_str();
  cmd->add_option("--kv-dtype", args.kv_dtype,
                  "KV cache pages: auto (CPU f32, CUDA its dtype), or on the CPU f32, f16 or bf16")
      ->check(CLI::IsMember({"auto", "f32", "f16", "bf16"}))
      ->capture_default_str();
}

Result<std::unique_ptr<Engine>> open_engine(const EngineArgs& args) {
  auto path = resolve_model(args.model);
  if (!path) return path.error();
  auto model = Model::load(*path);
  if (!model) return model.error();
  if (!args.adapter.empty())
    if (auto s = (*model)->merge_adapter(args.adapter); !s) return Error{"--adapter: " + s.message()};
  EngineOptions options{args.page_size, args.max_context, args.threads};
  auto backend = parse_backend(args.backend);
  if (!backend) return Error{"--backend: " + backend.message()};
  auto dtype = parse_gpu_dtype(args.dtype);
  if (!dtype) return Error{"--dtype: " + dtype.message()};
  options.backend = *backend;
  options.gpu_dtype = *dtype;
  auto weights = parse_weight_source(args.weights);
  if (!weights) return Error{"--weights: " + weights.message()};
  options.weights = *weights;
  auto kv_dtype = parse_kv_dtype(args.kv_dtype);
  if (!kv_dtype) return Error{"--kv-dtype: " + kv_dtype.message()};
  options.kv_dtype = *kv_dtype;
  return Engine::create(*model, options);
}

// --method NAME --set key=value ...: any plugin's method on the engine for
// one command, without a config file.
struct MethodArgs {
  std::string name;
  std::vector<std::string> sets;
};

void add_method_options(CLI::App* cmd, MethodArgs& args) {
  cmd->add_option("--method", args.name, "run under this plugin's method (inferlab plugins lists them)");
  cmd->add_option("--set", args.sets, "a parameter of --method, key=value (repeat for more)")
      ->allow_extra_args(false);
}

// The plugin's method, loaded (calibrated first when it asks) and set on the
// engine; it stays set while this lives.
struct CliMethod {
  PluginRegistry registry;
  MethodHandle handle;
  WeightOverrides overrides;
  Engine* engine = nullptr;
  ~CliMethod() {
    if (engine != nullptr) (void)engine->set_method(nullptr, 0);
  }
  Method* method() const { return handle.get(); }
};

// `text` as an absolute path to a file or folder that is there.
std::optional<std::string> existing_path(const std::string& text) {
  std::error_code ec;
  const auto path = std::filesystem::absolute(text, ec);
  if (ec || text.empty() || (!std::filesystem::is_regular_file(path, ec) && !std::filesystem::is_directory(path, ec)))
    return std::nullopt;
  return path.string();
}

// `text` as a value of `spec` (the spelling a config file would give it).
Result<ParamValue> parse_param_text(const ParamSpec& spec, const std::string& text) {
  auto bad = [&](const char* what) { return Error{fmt::format("--set {}={}: expected {}", spec.name, text, what)}; };
  auto integer = [](std::string_view t) -> std::optional<int64_t> {
    int64_t v = 0;
    const auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
    if (ec != std::errc() || end != t.data() + t.size()) return std::nullopt;
    return v;
  };
  auto real = [](const std::string& t) -> std::optional<double> {
    char* end = nullptr;
    const double v = std::strtod(t.c_str(), &end);
    if (t.empty() || end != t.c_str() + t.size() || !std::isfinite(v)) return std::nullopt;
    return v;
  };
  // Comma-separated values, each through `parse`.
  auto list = [&](auto parse, const char* what) -> Result<ParamValue> {
    std::vector<typename decltype(parse(std::string()))::value_type> out;
    std::stringstream ss(text);
    for (std::string item; std::getline(ss, item, ',');) {
      auto v = parse(item);
      if (!v) return bad(what);
      out.push_back(*v);
    }
    return ParamValue{std::move(out)};
  };
  switch (spec.type) {
    case ParamType::Int:
      if (auto v = integer(text)) return ParamValue{*v};
      return bad("an integer");
    case ParamType::Float:
      if (auto v = real(text)) return ParamValue{*v};
      return bad("a number");
    case ParamType::Bool:
      if (text == "true" || text == "1") return ParamValue{true};
      if (text == "false" || text == "0") return ParamValue{false};
      return bad("true or false");
    case ParamType::String:
    case ParamType::Schedule: return ParamValue{text};
    case ParamType::Path: {  // as in a config: a file or folder that is there (its content keys the run)
      auto path = existing_path(text);
      if (!path) return Error{fmt::format("--set {}={}: file or folder not found", spec.name, text)};
      return ParamValue{*path};
    }
    case ParamType::PathList: {  // comma-separated
      std::vector<std::string> paths;
      std::stringstream ss(text);
      for (std::string item; std::getline(ss, item, ',');) {
        auto path = existing_path(item);
        if (!path) return Error{fmt::format("--set {}={}: {}: file or folder not found", spec.name, text, item)};
        paths.push_back(*path);
      }
      return ParamValue{std::move(paths)};
    }
    case ParamType::IntList: return list(integer, "comma-separated integers");
    case ParamType::FloatList: return list(real, "comma-separated numbers");
  }
  return bad("a value");
}

// Nothing when no --method is given (dense); otherwise the method, set.
Result<std::unique_ptr<CliMethod>> open_method(Engine& engine, const MethodArgs& args) {
  if (args.name.empty()) {
    if (!args.sets.empty()) return Error{"--set needs --method"};
    return std::unique_ptr<CliMethod>();
  }
  auto m = std::make_unique<CliMethod>();
  if (auto s = m->registry.scan(PluginRegistry::default_search_path()); !s) return s.error();
  const PluginEntry* entry = m->registry.find(args.name);
  if (entry == nullptr) {
    std::vector<std::string> known;
    for (const PluginEntry& e : m->registry.entries()) known.push_back(e.name);
    return Error{fmt::format("--method {}: no such plugin (found: {})", args.name,
                             known.empty() ? std::string("none") : fmt::format("{}", fmt::join(known, ", ")))};
  }
  ParamValues params;
  for (const std::string& kv : args.sets) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) return Error{fmt::format("--set {}: expected key=value", kv)};
    const std::string key = kv.substr(0, eq);
    const auto spec = std::find_if(entry->params.begin(), entry->params.end(),
                                   [&](const ParamSpec& p) { return p.name == key; });
    if (spec == entry->params.end()) {
      std::vector<std::string> names;
      for (const ParamSpec& p : entry->params) names.push_back(p.name);
      return Error{fmt::format("--set {}: plugin {} has no parameter {} (its parameters: {})", kv, entry->name, key,
                               names.empty() ? std::string("none") : fmt::format("{}", fmt::join(names, ", ")))};
    }
    if (params.has(key)) return Error{fmt::format("--set {}: {} is given twice", kv, key)};
    auto value = parse_param_text(*spec, kv.substr(eq + 1));
    if (!value) return value.error();
    if (auto s = check_param_value(*spec, *value); !s) return Error{fmt::format("--set {}: {}", kv, s.message())};
    params.set(key, *value);
  }
  for (const ParamSpec& spec : entry->params)
    if (!params.has(spec.name)) params.set(spec.name, spec.default_value);
  auto handle = m->registry.create(args.name, params);
  if (!handle) return Error{fmt::format("--method {}: {}", args.name, handle.message())};
  m->handle = std::move(*handle);
  auto prepared = prepare_method(*m->method(), *entry, params, engine, {}, &m->overrides);
  if (!prepared) return Error{fmt::format("--method {}: {}", args.name, prepared.message())};
  if (auto s = engine.set_method(m->method(), entry->hooks, &m->overrides, args.name); !s) return s.error();
  m->engine = &engine;
  return m;
}

Result<std::string> read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error{fmt::format("{}: cannot open for reading", path)};
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Result<std::vector<int32_t>> parse_token_list(const std::string& text) {
  std::vector<int32_t> tokens;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      const long v = std::stol(item, &used);
      if (used != item.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(item);
      tokens.push_back(int32_t(v));
    } catch (const std::exception&) {
      return Error{fmt::format("--tokens: '{}' is not a token id", item)};
    }
  }
  if (tokens.empty()) return Error{"--tokens: no token ids given"};
  return tokens;
}

// The hyper-parameters every model has, GGUF or checkpoint folder.
void print_model_config(const ModelConfig& c, int64_t params) {
  fmt::print("name            {}\n", c.name);
  fmt::print("architecture    {}\n", c.architecture);
  fmt::print("parameters      {} ({:.1f}M)\n", params, double(params) / 1e6);
  fmt::print("layers          {}\n", c.n_layers);
  fmt::print("embedding       {}\n", c.n_embd);
  fmt::print("feed-forward    {}\n", c.n_ff);
  fmt::print("heads           {} query, {} kv (group {}), head dim {}\n", c.n_heads, c.n_kv_heads, c.group_size(),
             c.head_dim);
  fmt::print("rope            theta {}, {} dims, {}\n", c.rope_theta, c.rope_dim, c.rope_neox ? "neox" : "normal");
  fmt::print("rms norm eps    {}\n", c.rms_eps);
  fmt::print("context length  {}\n", c.context_length);
  if (c.qkv_bias || c.o_bias) fmt::print("biases          {}{}\n", c.qkv_bias ? "q k v" : "", c.o_bias ? " o" : "");
  if (c.has_window()) {
    std::vector<std::string> windows;
    for (int32_t l = 0; l < c.n_layers; ++l) windows.push_back(c.window(l) > 0 ? std::to_string(c.window(l)) : "full");
    fmt::print("sliding window  {}\n", fmt::join(windows, " "));
  }
  fmt::print("embeddings      {}\n", c.tied_embeddings ? "tied" : "untied");
}

int run_model_info(const std::string& name) {
  auto path = resolve_model(name);
  if (!path) return fail(path.message());
  if (hf::is_checkpoint(*path)) {
    auto model = Model::load(*path);
    if (!model) return fail(model.message());
    fmt::print("folder          {}\n", path->string());
    fmt::print("sha256          {}\n", (*model)->checksum());
    fmt::print("size            {:.1f} MiB of safetensors weights\n", double((*model)->file_size()) / (1 << 20));
    print_model_config((*model)->config(), (*model)->parameter_count());
    fmt::print("vocabulary      {} rows, {} tokens in tokenizer.json\n", (*model)->config().n_vocab,
               (*model)->tokenizer().vocab_size());
    return 0;
  }
  auto file = gguf::File::open(*path);
  if (!file) return fail(file.message());
  auto config = read_model_config(**file);
  if (!config) return fail(config.message());
  auto checksum = sha256_file(*path);
  if (!checksum) return fail(checksum.message());
  const ModelConfig& c = *config;
  std::map<std::string, int64_t> type_counts;
  int64_t params = 0;
  for (const auto& t : (*file)->tensors()) {
    type_counts[std::string(gguf::type_name(t.type))] += 1;
    params += t.n_elems();
  }
  std::vector<std::string> types;
  for (const auto& [name_, count] : type_counts) types.push_back(fmt::format("{} x{}", name_, count));
  fmt::print("file            {}\n", path->string());
  fmt::print("sha256          {}\n", *checksum);
  fmt::print("size            {:.1f} MiB (GGUF v{}, {} tensors)\n", double((*file)->file_size()) / (1 << 20),
             (*file)->version(), (*file)->tensors().size());
  print_model_config(c, params);
  fmt::print("vocabulary      {} ({})\n", c.n_vocab, (*file)->get_string("tokenizer.ggml.model").value_or("?"));
  fmt::print("tensor types    {}\n", fmt::join(types, ", "));
  return 0;
}

struct GenerateArgs {
  EngineArgs engine;
  MethodArgs method;
  std::string prompt;
  int32_t max_tokens = 64;
  float temperature = 0.0f;
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool raw = false;
  bool stats = false;
  bool chat = false;       // the prompt as a user message in the model's chat template
  std::string system;      // with chat: a system message (else the template's own default, if any)
};

int run_generate(const GenerateArgs& args) {
  auto engine = open_engine(args.engine);
  if (!engine) return fail(engine.message());
  auto method = open_method(**engine, args.method);
  if (!method) return fail(method.message());
  const Tokenizer& tok = (*engine)->model().tokenizer();
  std::string text = args.prompt;
  std::vector<int32_t> stops;
  bool bos = tok.add_bos_default();
  if (args.chat) {
    auto chat = parse_chat_template((*engine)->model().chat_template(), (*engine)->model().path().string());
    if (!chat) return fail(chat.message());
    std::vector<ChatMessage> messages;
    if (!args.system.empty()) messages.push_back({"system", args.system});
    messages.push_back({"user", args.prompt});
    text = render_chat(*chat, messages, /*add_generation_prompt=*/true);
    bos = false;  // the template writes its own (Llama-3's <|begin_of_text|>), or none
    const auto turn_end = tok.encode(end_of_turn(chat->format), false, /*parse_special=*/true);
    if (turn_end.size() != 1)
      return fail(fmt::format("{}: the vocabulary has no single token for {}", (*engine)->model().path().string(),
                              end_of_turn(chat->format)));
    stops.push_back(turn_end[0]);
  } else if (!args.system.empty()) {
    return fail("--system needs --chat");
  }
  auto prompt = tok.encode(text, bos, /*parse_special=*/true);
  if (prompt.empty()) return fail("the prompt encodes to no tokens");
  if (*method) (*method)->method()->begin_sequence((*engine)->shape());
  std::fputs(args.raw || args.chat ? "" : args.prompt.c_str(), stdout);
  auto result = generate(
      **engine, prompt, args.max_tokens, SamplerOptions{args.temperature, args.top_p, args.seed},
      [](const std::string& piece) {
        std::fputs(piece.c_str(), stdout);
        std::fflush(stdout);
      },
      stops);
  std::fputs("\n", stdout);
  if (!result) return fail(result.message());
  if (args.stats) {
    double decode_total = 0;
    for (double s : result->decode_seconds) decode_total += s;
    fmt::print(stderr, "prompt {} tokens, TTFT {:.1f} ms; generated {} tokens, {:.2f} tokens/s decode\n",
               prompt.size(), result->prefill_seconds * 1e3, result->tokens.size(),
               result->decode_seconds.empty() ? 0.0 : double(result->decode_seconds.size()) / decode_total);
  }
  return 0;
}

struct PerplexityArgs {
  EngineArgs engine;
  MethodArgs method;
  std::string text_file;
  int32_t ctx = 512;
  int32_t stride = 0;
  int64_t max_tokens = 0;
  bool json = false;
};

int run_perplexity(const PerplexityArgs& args) {
  auto text = read_text_file(args.text_file);
  if (!text) return fail(text.message());
  auto engine = open_engine(args.engine);
  if (!engine) return fail(engine.message());
  auto method = open_method(**engine, args.method);
  if (!method) return fail(method.message());
  const Tokenizer& tok = (*engine)->model().tokenizer();
  auto tokens = tok.encode(*text, tok.add_bos_default(), /*parse_special=*/false);
  if (args.max_tokens > 0 && int64_t(tokens.size()) > args.max_tokens) tokens.resize(size_t(args.max_tokens));
  const int32_t stride = args.stride > 0 ? args.stride : args.ctx;
  Method* m = *method ? (*method)->method() : nullptr;
  Engine& e = **engine;
  auto result = perplexity(e, tokens, args.ctx, stride, [m, &e] {
    if (m != nullptr) m->begin_sequence(e.shape());
  });
  if (!result) return fail(result.message());
  if (args.json) {
    nlohmann::json j = {{"ppl", result->ppl},          {"tokens", result->tokens_scored},
                        {"method", args.method.name.empty() ? std::string("dense") : args.method.name},
                        {"seconds", result->seconds},  {"mean_nll", result->mean_nll},
                        {"windows", result->windows},  {"ctx", args.ctx},
                        {"stride", stride},            {"model", (*engine)->model().path().string()}};
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("perplexity {:.4f} over {} tokens ({} windows of {} tokens, stride {}) in {:.1f} s\n", result->ppl,
               result->tokens_scored, result->windows, args.ctx, stride, result->seconds);
  }
  return 0;
}

struct LogitsArgs {
  EngineArgs engine;
  MethodArgs method;
  std::string prompt;
  std::string tokens;
  std::string out;
};

int run_logits(const LogitsArgs& args) {
  auto engine = open_engine(args.engine);
  if (!engine) return fail(engine.message());
  auto method = open_method(**engine, args.method);
  if (!method) return fail(method.message());
  const Tokenizer& tok = (*engine)->model().tokenizer();
  std::vector<int32_t> tokens;
  if (!args.tokens.empty()) {
    auto parsed = parse_token_list(args.tokens);
    if (!parsed) return fail(parsed.message());
    tokens = *parsed;
  } else {
    tokens = tok.encode(args.prompt, tok.add_bos_default(), true);
  }
  std::ofstream out;
  if (!args.out.empty()) {
    out.open(args.out, std::ios::binary | std::ios::trunc);
    if (!out) return fail(fmt::format("{}: cannot open for writing", args.out));
  }
  if (*method) (*method)->method()->begin_sequence((*engine)->shape());
  auto seq = (*engine)->new_sequence();
  std::vector<int32_t> top1;
  auto status = (*engine)->forward(*seq, tokens, 0, [&](int64_t, std::span<const float> logits) {
    top1.push_back(int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin()));
    if (out) out.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size_bytes()));
  });
  if (!status) return fail(status.message());
  if (out && !out.flush()) return fail(fmt::format("{}: write failed", args.out));
  nlohmann::json j = {{"tokens", tokens}, {"n_vocab", (*engine)->config().n_vocab}, {"top1", top1}, {"out", args.out}};
  fmt::print("{}\n", j.dump());
  return 0;
}

struct CaptureArgs {
  EngineArgs engine;
  std::string corpus = "kjv";
  int32_t samples = 16;
  int32_t tokens = 256;
  std::string taps;
  std::string out;
};

Result<uint32_t> parse_taps(const std::string& list) {
  uint32_t taps = 0;
  std::stringstream ss(list);
  for (std::string name; std::getline(ss, name, ',');) {
    const uint32_t bit = tap_from_name(name);
    if (bit == kTapLogits) return Error{"--taps: logits are not stored in an activation store"};
    if ((bit & kStorableTaps) == 0) {
      std::vector<std::string> known;
      for (uint32_t b : tap_bits(kStorableTaps)) known.emplace_back(tap_name(b));
      return Error{fmt::format("--taps: unknown tap '{}' (known: {})", name, fmt::join(known, ", "))};
    }
    taps |= bit;
  }
  if (taps == 0) return Error{"--taps: no tap named"};
  return taps;
}

int run_capture(const CaptureArgs& args) {
  auto taps = parse_taps(args.taps);
  if (!taps) return fail(taps.message());
  auto engine = open_engine(args.engine);
  if (!engine) return fail(engine.message());
  CalibrationRequest request{args.corpus, args.samples, args.tokens, *taps};
  request.stored = true;
  const auto root = args.out.empty() ? default_activation_root() : std::filesystem::path(args.out);
  auto dir = capture_activations(**engine, request, root);
  if (!dir) return fail(dir.message());
  auto store = ActivationStore::open(*dir);
  if (!store) return fail(store.message());
  std::vector<std::string> widths;
  for (uint32_t b : tap_bits(store->taps())) widths.push_back(fmt::format("{} {}", tap_name(b), store->width(b)));
  fmt::print("store   {}\n", dir->string());
  fmt::print("rows    {} ({} samples of {} tokens)\n", store->rows(), store->samples(), store->tokens_per_sample());
  fmt::print("taps    {} (values per row, each of {} layers)\n", fmt::join(widths, ", "), store->n_layers());
  fmt::print("bytes   {} ({:.1f} MiB)\n", store->bytes(), double(store->bytes()) / double(1 << 20));
  return 0;
}

int run_tokenize(const std::string& model_name, const std::string& prompt, bool no_special) {
  auto path = resolve_model(model_name);
  if (!path) return fail(path.message());
  auto file = gguf::File::open(*path);
  if (!file) return fail(file.message());
  auto tok = Tokenizer::from_gguf(**file);
  if (!tok) return fail(tok.message());
  auto tokens = (*tok)->encode(prompt, false, !no_special);
  std::vector<std::string> pieces;
  for (int32_t t : tokens) pieces.push_back((*tok)->token_to_piece(t));
  nlohmann::json j = {{"tokens", tokens}, {"pieces", nlohmann::json(pieces)}};
  fmt::print("{}\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  return 0;
}

}  // namespace

struct SynthArgs {
  std::string preset;
  std::string out;
  std::string type = "f16";
  int32_t layers = 0;
  uint64_t seed = 1;
};

int run_synth(const SynthArgs& args) {
  auto spec = synthetic_preset(args.preset, args.layers);
  if (!spec) return fail(spec.message());
  spec->seed = args.seed;
  spec->weight_type = args.type == "f32" ? gguf::TensorType::F32
                      : args.type == "q8_0" ? gguf::TensorType::Q8_0
                                            : gguf::TensorType::F16;
  if (auto s = write_synthetic_model(*spec, args.out); !s) return fail(s.message());
  std::printf("wrote %s (%s, %d layers, seed %llu)\n", args.out.c_str(), spec->name.c_str(), spec->n_layers,
              static_cast<unsigned long long>(args.seed));
  return 0;
}

int exit_code() { return g_exit_code; }
void set_exit_code(int code) { g_exit_code = code; }

void register_commands(CLI::App& app) {
  // model info
  auto* model = app.add_subcommand("model", "inspect model files");
  model->require_subcommand(1);
  static SynthArgs synth;
  auto* sy = model->add_subcommand("synth", "write a model of a real shape with random weights (GGUF), for timing");
  sy->add_option("--preset", synth.preset, fmt::format("one of {}", fmt::join(synthetic_preset_names(), ", ")))
      ->required();
  sy->add_option("-o,--out", synth.out, "output .gguf path")->required();
  sy->add_option("--layers", synth.layers, "keep only the first N layers (0: all)")->check(CLI::Range(0, 1024));
  sy->add_option("--type", synth.type, "weight type")->check(CLI::IsMember({"f16", "f32", "q8_0"}))->capture_default_str();
  sy->add_option("--seed", synth.seed, "random seed")->capture_default_str();
  sy->callback([] { set_exit_code(run_synth(synth)); });
  auto* info = model->add_subcommand("info", "architecture, shapes, tensor types, parameters, checksum");
  static std::string info_model;
  info->add_option("model", info_model, "model short name, .gguf path or checkpoint folder")->required();
  info->callback([] { g_exit_code = run_model_info(info_model); });

  static GenerateArgs gen;
  auto* g = app.add_subcommand("generate", "generate text from a prompt (streams to stdout)");
  add_engine_options(g, gen.engine);
  add_method_options(g, gen.method);
  g->add_option("-p,--prompt", gen.prompt, "prompt text")->required();
  g->add_option("-n,--max-tokens", gen.max_tokens, "tokens to generate")->check(CLI::Range(0, 1 << 30))->capture_default_str();
  g->add_option("--temperature", gen.temperature, "0 = greedy")->check(CLI::Range(0.0f, 100.0f))->capture_default_str();
  g->add_option("--top-p", gen.top_p, "nucleus sampling mass")->check(CLI::Range(0.0f, 1.0f))->capture_default_str();
  g->add_option("--seed", gen.seed, "sampling seed")->capture_default_str();
  g->add_flag("--raw", gen.raw, "do not echo the prompt");
  g->add_flag("--stats", gen.stats, "print TTFT and decode speed to stderr");
  g->add_flag("--chat", gen.chat,
              "the prompt as a user message in the model's chat template (ChatML, Llama-3); stops at the end of "
              "the turn");
  g->add_option("--system", gen.system, "with --chat: a system message (default: the template's own, if any)");
  g->callback([] { g_exit_code = run_generate(gen); });

  static PerplexityArgs ppl;
  auto* p = app.add_subcommand("perplexity", "perplexity of a text file in windows of --ctx tokens");
  add_engine_options(p, ppl.engine);
  add_method_options(p, ppl.method);
  p->add_option("--text", ppl.text_file, "UTF-8 text file")->required();
  p->add_option("--ctx", ppl.ctx, "window length in tokens")->check(CLI::Range(2, 1 << 20))->capture_default_str();
  p->add_option("--stride", ppl.stride, "window advance (default: --ctx)")->check(CLI::Range(1, 1 << 30));
  p->add_option("--max-tokens", ppl.max_tokens, "use only the first N tokens of the text")->check(CLI::Range(0, 1 << 30));
  p->add_flag("--json", ppl.json, "print one JSON object");
  p->callback([] { g_exit_code = run_perplexity(ppl); });

  static LogitsArgs lg;
  auto* l = app.add_subcommand("logits", "logits of every position of a prompt (for comparisons)");
  add_engine_options(l, lg.engine);
  add_method_options(l, lg.method);
  auto* lp = l->add_option("-p,--prompt", lg.prompt, "prompt text");
  auto* lt = l->add_option("--tokens", lg.tokens, "comma-separated token ids");
  lp->excludes(lt);
  l->add_option("--out", lg.out, "write float32 logits (n_tokens, n_vocab) row-major here");
  l->callback([lp, lt] {
    if (lp->count() + lt->count() == 0) {
      g_exit_code = fail("logits: give --prompt or --tokens");
      return;
    }
    g_exit_code = run_logits(lg);
  });

  static CaptureArgs cap;
  auto* c = app.add_subcommand("capture", "write a model's intermediates over a calibration corpus to an activation store");
  add_engine_options(c, cap.engine);
  c->add_option("--corpus", cap.corpus, "kjv, kv_retrieval or a text file")->capture_default_str();
  c->add_option("--samples", cap.samples, "corpus windows")->check(CLI::Range(1, 1 << 24))->capture_default_str();
  c->add_option("--tokens", cap.tokens, "tokens per window, BOS included")->check(CLI::Range(2, 1 << 24))->capture_default_str();
  c->add_option("--taps", cap.taps,
                "comma list: hidden_in, attention_in, queries, keys, values, attention_out, ffn_in, ffn_gate, "
                "ffn_activation")
      ->required();
  c->add_option("--out", cap.out, "store root (default: <artifact folder>/activations)");
  c->callback([] { g_exit_code = run_capture(cap); });

  static std::string tok_model = "smollm2-135m", tok_prompt;
  static bool tok_no_special = false;
  auto* t = app.add_subcommand("tokenize", "token ids and pieces of a text (JSON)");
  t->add_option("-m,--model", tok_model, "model short name, .gguf path or checkpoint folder")->capture_default_str();
  t->add_option("-p,--prompt", tok_prompt, "text")->required();
  t->add_flag("--no-special", tok_no_special, "treat special-token text as plain text");
  t->callback([] { g_exit_code = run_tokenize(tok_model, tok_prompt, tok_no_special); });
}

}  // namespace inferlab::cli
