#include "experiment/config.h"

#include "formats/peft_adapter.h"
#include "model/model.h"
#include "experiment/risk_control.h"
#include "plugins/param_check.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <openssl/evp.h>
#include <toml++/toml.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cmath>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>

namespace inferlab {

namespace {

namespace fs = std::filesystem;

// Every problem found in a config, so a researcher can fix them all in one pass.
class Diagnostics {
 public:
  explicit Diagnostics(std::string source) : source_(std::move(source)) {}

  void add(const toml::source_region& where, const std::string& key, const std::string& message) {
    // Implicitly created tables have no position: point at the start of the file.
    const uint32_t line = std::max<uint32_t>(where.begin.line, 1);
    const uint32_t column = std::max<uint32_t>(where.begin.column, 1);
    entries_.push_back({line, column, fmt::format("{}:{}:{}: {}: {}", source_, line, column, key, message)});
  }
  bool empty() const { return entries_.empty(); }

  // One line per problem, in file order (tables iterate their keys sorted by name).
  Error error() const {
    auto sorted = entries_;
    std::stable_sort(sorted.begin(), sorted.end(), [](const Entry& a, const Entry& b) {
      return std::tie(a.line, a.column) < std::tie(b.line, b.column);
    });
    std::string text;
    for (const auto& e : sorted) text += (text.empty() ? "" : "\n") + e.text;
    return Error{text};
  }

 private:
  struct Entry {
    uint32_t line, column;
    std::string text;
  };
  std::string source_;
  std::vector<Entry> entries_;
};

const char* type_phrase(ParamType type) {
  switch (type) {
    case ParamType::Int: return "an integer";
    case ParamType::Float: return "a number";
    case ParamType::Bool: return "true or false";
    case ParamType::String: return "a string";
    case ParamType::Path: return "a file or folder path (a string)";
    case ParamType::Schedule: return "a per-layer schedule (a string like \"0-1=1.0; 2-9=0.5\")";
    case ParamType::IntList: return "a list of integers";
    case ParamType::FloatList: return "a list of numbers";
    case ParamType::PathList: return "a list of file or folder paths (strings)";
  }
  return "?";
}

// How a TOML value reads in a message: its kind, and its text for scalars.
std::string describe(const toml::node& node) {
  if (const auto* v = node.as_integer()) return fmt::format("an integer ({})", v->get());
  if (const auto* v = node.as_floating_point()) return fmt::format("a float ({})", param_value_to_string(v->get()));
  if (const auto* v = node.as_boolean()) return fmt::format("a boolean ({})", v->get() ? "true" : "false");
  if (const auto* v = node.as_string()) return fmt::format("a string (\"{}\")", v->get());
  if (node.is_array()) return "a list";
  if (node.is_table()) return "a table";
  return "a date/time";
}

// The TOML value as `type`: integers widen to floats; nothing else converts
// (a bool is never a number, a float never silently truncates to an integer).
std::optional<ParamValue> as_param_type(const toml::node& node, ParamType type) {
  switch (type) {
    case ParamType::Int:
      if (const auto* v = node.as_integer()) return ParamValue{int64_t(v->get())};
      break;
    case ParamType::Float:
      if (const auto* v = node.as_floating_point()) return ParamValue{v->get()};
      if (const auto* v = node.as_integer()) return ParamValue{double(v->get())};
      break;
    case ParamType::Bool:
      if (const auto* v = node.as_boolean()) return ParamValue{v->get()};
      break;
    case ParamType::String:
    case ParamType::Path:
    case ParamType::Schedule:
      if (const auto* v = node.as_string()) return ParamValue{v->get()};
      break;
    case ParamType::IntList:
    case ParamType::FloatList: {
      const auto* array = node.as_array();
      if (array == nullptr) break;
      std::vector<int64_t> ints;
      std::vector<double> reals;
      for (const toml::node& element : *array) {
        const ParamType scalar = type == ParamType::IntList ? ParamType::Int : ParamType::Float;
        const auto one = as_param_type(element, scalar);
        if (!one) return std::nullopt;
        if (type == ParamType::IntList) ints.push_back(std::get<int64_t>(*one));
        else reals.push_back(std::get<double>(*one));
      }
      if (type == ParamType::IntList) return ParamValue{std::move(ints)};
      return ParamValue{std::move(reals)};
    }
    case ParamType::PathList: {
      if (const auto* v = node.as_string()) return ParamValue{std::vector<std::string>{v->get()}};  // one path
      const auto* array = node.as_array();
      if (array == nullptr) break;
      std::vector<std::string> paths;
      for (const toml::node& element : *array) {
        const auto* text = element.as_string();
        if (text == nullptr) return std::nullopt;
        paths.push_back(text->get());
      }
      return ParamValue{std::move(paths)};
    }
  }
  return std::nullopt;
}

std::string names_of(const std::vector<ParamSpec>& specs) {
  std::vector<std::string> names;
  for (const auto& s : specs) names.push_back(s.name);
  return fmt::format("{}", fmt::join(names, ", "));
}

std::string unknown_parameter(const std::string& kind, const std::string& name, const std::vector<ParamSpec>& specs) {
  if (specs.empty()) return fmt::format("unknown parameter: {} \"{}\" takes no parameters", kind, name);
  return fmt::format("unknown parameter of {} \"{}\" (its parameters: {})", kind, name, names_of(specs));
}

bool is_valid_name(const std::string& name) {
  return !name.empty() && std::all_of(name.begin(), name.end(), [](unsigned char c) {
    return std::isalnum(c) != 0 || c == '_' || c == '.' || c == '-';
  });
}

bool ends_with(const std::string& text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A task parameter that names a file ("path", "corpus_path", ...).
bool is_path_param(const ParamSpec& spec) {
  return spec.type == ParamType::String && (spec.name == "path" || ends_with(spec.name, "_path"));
}

// Parses one config document against the catalog, collecting every problem.
class ConfigParser {
 public:
  ConfigParser(std::string source, const Catalog& catalog)
      : source_(std::move(source)), diag_(source_), catalog_(catalog), base_dir_(folder_of(source_)) {}

  Result<ExperimentConfig> parse(const toml::table& root) {
    ExperimentConfig config;
    config.path = source_;
    check_top_level(root);
    parse_experiment_section(root, config);
    parse_model_section(root, config.model);
    parse_tasks(root, config.tasks);
    check_batch(config);
    parse_methods(root, config.methods);
    parse_ltt(root, config);
    if (!diag_.empty()) return diag_.error();
    return config;
  }

 private:
  using TableList = std::vector<std::pair<const toml::table*, std::string>>;

  static fs::path folder_of(const std::string& source) {
    std::error_code ec;
    const fs::path file = source.empty() ? fs::path("config.toml") : fs::path(source);
    const fs::path absolute = fs::absolute(file, ec);
    return (ec ? file : absolute).lexically_normal().parent_path();
  }

  // Relative paths in a config mean "next to the config", not "wherever inferlab runs".
  std::string resolve_path(const std::string& text) const {
    const fs::path path(text);
    return (path.is_absolute() ? path : base_dir_ / path).lexically_normal().string();
  }

public:
  Result<FinetuneConfig> parse_finetune(const toml::table& root) {
    FinetuneConfig config;
    config.path = source_;
    for (auto&& [name, node] : root)
      if (name != "model" && name != "finetune")
        diag_.add(name.source(), std::string(name.str()),
                  fmt::format("unknown {} (a fine-tuning config has [model] and [finetune])",
                              node.is_table() ? "table" : "key"));
    parse_model_section(root, config.model);
    if (const toml::table* table = section(root, "finetune", true)) parse_finetune_section(*table, config.finetune);
    if (!diag_.empty()) return diag_.error();
    return config;
  }

  void parse_finetune_section(const toml::table& table, FinetuneSection& f) {
    static const std::vector<ParamSpec> specs = {
        ParamSpec::string("name", "", {}, ""),
        ParamSpec::path_list("data", ""),
        ParamSpec::string("data_format", "auto", {"auto", "text", "jsonl"}, ""),
        ParamSpec::string("corpus", "", {}, ""),
        ParamSpec::int_list("corpus_bytes", {}, 0, std::nullopt, ""),
        ParamSpec::int_list("layers", {}, 0, std::nullopt, ""),
        ParamSpec::integer("r", 8, 1, 4096, ""),
        ParamSpec::real("alpha", 16, 1e-6, 1e6, ""),
        ParamSpec::boolean("rslora", false, ""),
        ParamSpec::real("dropout", 0, 0, 0.95, ""),
        ParamSpec::string("quant", "none", {"none", "nf4", "fp4", "int4"}, ""),
        ParamSpec::boolean("double_quant", true, ""),
        ParamSpec::integer("block_size", 64, 2, 4096, ""),
        ParamSpec::real("lr", 2e-4, 0, 10, ""),
        ParamSpec::real("weight_decay", 0, 0, 10, ""),
        ParamSpec::real("beta1", 0.9, 0, 0.999999, ""),
        ParamSpec::real("beta2", 0.999, 0, 0.999999, ""),
        ParamSpec::real("eps", 1e-8, 0, 1, ""),
        ParamSpec::real("max_grad_norm", 1.0, 0, 1e6, ""),
        ParamSpec::string("schedule", "constant", {"constant", "cosine", "linear"}, ""),
        ParamSpec::integer("warmup_steps", 0, 0, std::nullopt, ""),
        ParamSpec::integer("steps", 0, 1, std::nullopt, ""),
        ParamSpec::integer("batch", 4, 1, 4096, ""),
        ParamSpec::integer("grad_accum", 1, 1, 65536, ""),
        ParamSpec::integer("seq_len", 256, 2, 1 << 20, ""),
        ParamSpec::integer("seed", 0, 0, std::nullopt, ""),
        ParamSpec::boolean("checkpoint_layers", false, ""),
        ParamSpec::string("backend", "cpu", {"cpu", "cuda"}, ""),
        ParamSpec::string("exit_loss", "none", {"none", "calm"}, ""),
        ParamSpec::float_list("exit_weights", {}, 0, std::nullopt, ""),
        ParamSpec::integer("skip_max_exit", 0, 0, 1 << 16, ""),
        ParamSpec::integer("skip_min_exit", 0, 0, 1 << 16, ""),
        ParamSpec::integer("skip_warmup_layers", 1, 0, 1 << 16, ""),
        ParamSpec::integer("skip_schedule_length", 256, 1, 1 << 24, ""),
        ParamSpec::integer("checkpoint_every", 50, 1, std::nullopt, ""),
        ParamSpec::integer("log_every", 10, 1, std::nullopt, ""),
        ParamSpec::real("eval_fraction", 0, 0, 0.5, ""),
        ParamSpec::integer("eval_every", 0, 0, std::nullopt, ""),
        ParamSpec::integer("threads", 0, 0, std::nullopt, ""),
        ParamSpec::string("output", "", {}, ""),
        ParamSpec::boolean("overwrite", false, ""),
        ParamSpec::boolean("gguf", false, "")};
    ParamValues values;
    for (const auto& spec : specs) values.set(spec.name, spec.default_value);
    for (auto&& [name, node] : table) {
      if (name == "targets" || name == "task") continue;
      const std::string full = "finetune." + std::string(name.str());
      const auto spec = std::find_if(specs.begin(), specs.end(),
                                     [wanted = std::string(name.str())](const ParamSpec& s) { return s.name == wanted; });
      if (spec == specs.end()) {
        diag_.add(name.source(), full, fmt::format("unknown key (known keys: {}, targets, task)", names_of(specs)));
        continue;
      }
      if (auto value = convert(node, *spec, full)) values.set(spec->name, std::move(*value));
    }
    f.name = values.get_string("name");
    f.data = values.get_path_list("data");
    f.data_format = values.get_string("data_format");
    f.corpus = values.get_string("corpus");
    // Like a task's path: a bare name is a corpus, anything like a file next to the config.
    if (f.corpus.find('/') != std::string::npos || ends_with(f.corpus, ".txt")) f.corpus = resolve_path(f.corpus);
    f.corpus_bytes = values.get_int_list("corpus_bytes");
    if (const toml::node* range = table.get("corpus_bytes")) {
      if (f.corpus_bytes.size() != 2 || f.corpus_bytes[0] >= f.corpus_bytes[1])
        diag_.add(range->source(), "finetune.corpus_bytes", "expected [begin, end) with begin < end");
      if (f.corpus.empty()) diag_.add(range->source(), "finetune.corpus_bytes", "needs finetune.corpus");
    }
    f.layers = values.get_int_list("layers");
    f.r = values.get_int("r");
    f.alpha = values.get_float("alpha");
    f.rslora = values.get_bool("rslora");
    f.dropout = values.get_float("dropout");
    f.quant = values.get_string("quant");
    f.double_quant = values.get_bool("double_quant");
    f.block_size = values.get_int("block_size");
    f.lr = values.get_float("lr");
    f.weight_decay = values.get_float("weight_decay");
    f.beta1 = values.get_float("beta1");
    f.beta2 = values.get_float("beta2");
    f.eps = values.get_float("eps");
    f.max_grad_norm = values.get_float("max_grad_norm");
    f.schedule = values.get_string("schedule");
    f.warmup_steps = values.get_int("warmup_steps");
    f.steps = values.get_int("steps");
    f.batch = values.get_int("batch");
    f.grad_accum = values.get_int("grad_accum");
    f.seq_len = values.get_int("seq_len");
    f.seed = values.get_int("seed");
    f.checkpoint_layers = values.get_bool("checkpoint_layers");
    f.backend = values.get_string("backend");
    f.exit_loss = values.get_string("exit_loss");
    f.exit_weights = values.get_float_list("exit_weights");
    f.skip_max_exit = values.get_int("skip_max_exit");
    f.skip_min_exit = values.get_int("skip_min_exit");
    f.skip_warmup_layers = values.get_int("skip_warmup_layers");
    f.skip_schedule_length = values.get_int("skip_schedule_length");
    if (const toml::node* w = table.get("exit_weights"); w != nullptr && f.exit_loss != "none")
      diag_.add(w->source(), "finetune.exit_weights", "set either exit_weights or exit_loss, not both");
    f.checkpoint_every = values.get_int("checkpoint_every");
    f.log_every = values.get_int("log_every");
    f.eval_fraction = values.get_float("eval_fraction");
    f.eval_every = values.get_int("eval_every");
    f.threads = values.get_int("threads");
    f.overwrite = values.get_bool("overwrite");
    f.gguf = values.get_bool("gguf");
    if (f.gguf && f.rslora && table.get("gguf") != nullptr)
      diag_.add(table.get("gguf")->source(), "finetune.gguf",
                "llama.cpp's adapters scale by alpha / r: an rsLoRA adapter cannot be written as GGUF");

    if (f.name.empty()) f.name = fs::path(source_).stem().string();
    if (!is_valid_name(f.name))
      diag_.add(table.get("name") ? table.get("name")->source() : table.source(), "finetune.name",
                fmt::format("\"{}\" is not a valid name: use letters, digits, '_', '.' and '-'", f.name));
    if (table.get("steps") == nullptr) diag_.add(table.source(), "finetune.steps", "missing: how many optimizer steps");
    if (f.block_size % 2 != 0)
      diag_.add(table.get("block_size")->source(), "finetune.block_size", "must be even");
    if (f.warmup_steps > f.steps && table.get("warmup_steps") != nullptr)
      diag_.add(table.get("warmup_steps")->source(), "finetune.warmup_steps",
                fmt::format("{} warm-up steps exceed the {} steps", f.warmup_steps, f.steps));
    const toml::node* output = table.get("output");
    if (output == nullptr || !output->is_string() || output->as_string()->get().empty())
      diag_.add(output ? output->source() : table.source(), "finetune.output",
                "missing: the folder to write the adapter to");
    else
      f.output = resolve_path(output->as_string()->get());

    // targets: a list of Hugging Face projection names, or "all-linear".
    const auto& kProjections = peft::kProjectionModules;
    const std::string known = fmt::format("{}", fmt::join(kProjections, ", "));
    if (const toml::node* t = table.get("targets")) {
      std::vector<std::string> names;
      if (const auto* text = t->as_string()) {
        if (text->get() == "all-linear") names.assign(kProjections.begin(), kProjections.end());
        else names.push_back(text->get());
      } else if (const auto* list = t->as_array()) {
        for (const auto& e : *list) {
          if (const auto* x = e.as_string()) names.push_back(x->get());
          else diag_.add(e.source(), "finetune.targets", "expected projection names, got " + describe(e));
        }
        if (list->empty()) diag_.add(t->source(), "finetune.targets", "empty list: name at least one projection");
      } else {
        diag_.add(t->source(), "finetune.targets", "expected a list of projection names or \"all-linear\", got " +
                                                       describe(*t));
      }
      for (const auto& n : names) {
        if (std::find(kProjections.begin(), kProjections.end(), n) == kProjections.end())
          diag_.add(t->source(), "finetune.targets",
                    fmt::format("\"{}\" is not a projection of this architecture (known: {}, or \"all-linear\")", n,
                                known));
      }
      for (const auto& p : kProjections)
        if (std::find(names.begin(), names.end(), p) != names.end()) f.targets.push_back(p);
    } else {
      f.targets = {"q_proj", "v_proj"};
    }

    if (const toml::node* task = table.get("task")) {
      if (const auto* task_table = task->as_table()) f.task = parse_task(*task_table, "finetune.task");
      else diag_.add(task->source(), "finetune.task", "expected a [finetune.task] table, got " + describe(*task));
    }
    if (f.data.empty() && f.corpus.empty() && table.get("task") == nullptr)
      diag_.add(table.source(), "finetune.data",
                "missing: training data files (text or JSONL), a corpus, or a [finetune.task]");
  }

private:
  void check_top_level(const toml::table& root) {
    static const std::set<std::string, std::less<>> known = {"experiment", "model", "task", "method", "ltt"};
    for (auto&& [name, node] : root) {
      if (known.count(name.str()) != 0) continue;
      diag_.add(name.source(), std::string(name.str()),
                fmt::format("unknown {} (a config has [experiment], [model], [task] or [[task]], [[method]], and "
                            "optionally [ltt])",
                            node.is_table() ? "table" : "key"));
    }
  }

  // A section that must be one table; nullptr (reported when required) otherwise.
  const toml::table* section(const toml::table& root, std::string_view name, bool required) {
    const toml::node* node = root.get(name);
    if (node == nullptr) {
      if (required) diag_.add(root.source(), std::string(name), fmt::format("missing: add a [{}] table", name));
      return nullptr;
    }
    if (const auto* table = node->as_table()) return table;
    diag_.add(node->source(), std::string(name), fmt::format("expected a [{}] table, got {}", name, describe(*node)));
    return nullptr;
  }

  // A section written as one [name] table or as [[name]] tables, each with its key path.
  TableList table_list(const toml::node& node, const std::string& name) {
    if (const auto* table = node.as_table()) return {{table, name}};
    const auto* array = node.as_array();
    if (array == nullptr || array->empty()) {
      diag_.add(node.source(), name, fmt::format("expected [{0}] or [[{0}]] tables, got {1}", name,
                                                 array ? "an empty list" : describe(node)));
      return {};
    }
    TableList tables;
    for (size_t i = 0; i < array->size(); ++i) {
      const std::string key = fmt::format("{}[{}]", name, i + 1);
      if (const auto* table = (*array)[i].as_table()) tables.emplace_back(table, key);
      else diag_.add((*array)[i].source(), key, "expected a table, got " + describe((*array)[i]));
    }
    return tables;
  }

  // One value checked against `spec`; reported and nullopt when it does not fit.
  std::optional<ParamValue> convert(const toml::node& node, const ParamSpec& spec, const std::string& key) {
    auto value = as_param_type(node, spec.type);
    if (!value) {
      diag_.add(node.source(), key, fmt::format("expected {}, got {}", type_phrase(spec.type), describe(node)));
      return std::nullopt;
    }
    if (const std::string why = param_problem(spec, *value); !why.empty()) {
      diag_.add(node.source(), key, why);
      return std::nullopt;
    }
    // Paths: next to the config when relative; there now (their content enters the run hash).
    auto existing = [&](const std::string& given) -> std::optional<std::string> {
      const std::string path = resolve_path(given);
      std::error_code ec;
      if (fs::is_regular_file(path, ec) || fs::is_directory(path, ec)) return path;
      diag_.add(node.source(), key, fmt::format("file or folder not found: {}", path));
      return std::nullopt;
    };
    if (spec.type == ParamType::Path && !std::get<std::string>(*value).empty()) {
      auto path = existing(std::get<std::string>(*value));
      if (!path) return std::nullopt;
      value = ParamValue{*path};
    }
    if (spec.type == ParamType::PathList) {
      std::vector<std::string> paths;
      for (const std::string& given : std::get<std::vector<std::string>>(*value)) {
        auto path = existing(given);
        if (!path) return std::nullopt;
        paths.push_back(*path);
      }
      value = ParamValue{std::move(paths)};
    }
    return value;
  }

  // A scalar (a one-element list) or a non-empty list, every element checked.
  // For a list-typed parameter a list is one value and a list of lists the axis.
  std::optional<std::vector<ParamValue>> convert_list(const toml::node& node, const ParamSpec& spec,
                                                      const std::string& key) {
    const auto* array = node.as_array();
    if (array != nullptr && param_type_is_list(spec.type) && (array->empty() || !(*array)[0].is_array()))
      array = nullptr;  // the value itself
    if (array == nullptr) {
      auto value = convert(node, spec, key);
      if (!value) return std::nullopt;
      return std::vector<ParamValue>{std::move(*value)};
    }
    if (array->empty()) {
      diag_.add(node.source(), key, "empty list: give at least one value");
      return std::nullopt;
    }
    std::vector<ParamValue> values;
    for (const toml::node& element : *array)
      if (auto value = convert(element, spec, key)) values.push_back(std::move(*value));
    if (values.size() != array->size()) return std::nullopt;
    return values;
  }

  // A table of scalar keys declared in `specs`, defaults filled in.
  // `handled`: keys the caller reads itself.
  ParamValues read_scalars(const toml::table& table, const std::string& key, const std::vector<ParamSpec>& specs,
                           const std::vector<std::string>& handled = {}) {
    ParamValues values;
    for (const auto& spec : specs) values.set(spec.name, spec.default_value);
    for (auto&& [name, node] : table) {
      if (std::find(handled.begin(), handled.end(), name.str()) != handled.end()) continue;
      const std::string full = key + "." + std::string(name.str());
      const auto spec =
          std::find_if(specs.begin(), specs.end(), [wanted = std::string(name.str())](const ParamSpec& s) { return s.name == wanted; });
      if (spec == specs.end()) {
        diag_.add(name.source(), full, fmt::format("unknown key (known keys: {})", names_of(specs)));
        continue;
      }
      if (auto value = convert(node, *spec, full)) values.set(spec->name, std::move(*value));
    }
    return values;
  }

  // A string a section cannot do without.
  std::optional<std::string> required_string(const toml::table& table, std::string_view name, const std::string& key,
                                             const std::string& hint) {
    const std::string full = key + "." + std::string(name);
    const toml::node* node = table.get(name);
    if (node == nullptr) {
      diag_.add(table.source(), full, "missing: " + hint);
      return std::nullopt;
    }
    if (const auto* text = node->as_string()) return text->get();
    diag_.add(node->source(), full, "expected a string, got " + describe(*node));
    return std::nullopt;
  }

  void parse_experiment_section(const toml::table& root, ExperimentConfig& config) {
    static const std::vector<ParamSpec> specs = {
        ParamSpec::string("name", "", {}, ""), ParamSpec::integer("seed", 0, 0, std::nullopt, ""),
        ParamSpec::string("backend", "cpu", {"cpu", "cuda", "auto"}, ""), ParamSpec::string("description", "", {}, ""),
        // Their default, 0, means "none" and "the machine's": not a value to write. Bounded so a
        // deadline and a byte count stay representable; a limit leaves room for model and runtime.
        ParamSpec::real("timeout", 0, 1, 1e7, ""), ParamSpec::integer("memory_limit_mb", 0, 64, 1 << 30, "")};
    const toml::table* table = section(root, "experiment", true);
    if (table == nullptr) return;
    const ParamValues values = read_scalars(*table, "experiment", specs, {"batch"});
    parse_batch(*table, config);
    config.name = values.get_string("name");
    config.seed = values.get_int("seed");
    config.backend = values.get_string("backend");
    config.description = values.get_string("description");
    config.timeout = values.get_float("timeout");
    config.memory_limit_mb = values.get_int("memory_limit_mb");
    const toml::node* name = table->get("name");
    if (name == nullptr)
      diag_.add(table->source(), "experiment.name", "missing: name the experiment (letters, digits, '_', '.', '-')");
    else if (name->is_string() && !is_valid_name(config.name))
      diag_.add(name->source(), "experiment.name",
                fmt::format("\"{}\" is not a valid name: use letters, digits, '_', '.' and '-'", config.name));
  }

  // experiment.batch: sequences a step may run (continuous batching), one
  // value or a list (a grid axis); > 1 only for throughput tasks (checked
  // once the tasks are read).
  void parse_batch(const toml::table& table, ExperimentConfig& config) {
    const toml::node* node = table.get("batch");
    if (node == nullptr) return;
    batch_source_ = node->source();
    std::vector<const toml::node*> items;
    if (const auto* list = node->as_array()) {
      for (const auto& item : *list) items.push_back(&item);
      if (items.empty()) diag_.add(node->source(), "experiment.batch", "the list is empty");
    } else {
      items.push_back(node);
    }
    config.batch.clear();
    for (const toml::node* item : items) {
      const auto* value = item->as_integer();
      if (value == nullptr) {
        diag_.add(item->source(), "experiment.batch", "expected a whole number of sequences, got " + describe(*item));
        continue;
      }
      if (value->get() < 1 || value->get() > 4096) {
        diag_.add(item->source(), "experiment.batch",
                  fmt::format("{} sequences per step: a batch holds 1 to 4096", value->get()));
        continue;
      }
      if (std::find(config.batch.begin(), config.batch.end(), value->get()) != config.batch.end()) {
        diag_.add(item->source(), "experiment.batch", fmt::format("{} is listed twice", value->get()));
        continue;
      }
      config.batch.push_back(value->get());
    }
    if (config.batch.empty()) config.batch = {1};
  }

  void check_batch(const ExperimentConfig& config) {
    if (std::all_of(config.batch.begin(), config.batch.end(), [](int64_t b) { return b == 1; })) return;
    for (size_t t = 0; t < config.tasks.size(); ++t)
      if (config.tasks[t].type != "throughput")
        diag_.add(batch_source_, "experiment.batch",
                  fmt::format("a batch above 1 serves throughput tasks only; [[task]] {} is '{}' (put it in an "
                              "experiment of its own)",
                              t + 1, config.tasks[t].type));
  }

  void parse_model_section(const toml::table& root, ModelSection& model) {
    static const std::vector<ParamSpec> specs = {
        ParamSpec::string("name", "", {}, ""), ParamSpec::integer("page_size", 16, 1, 65536, ""),
        ParamSpec::integer("max_context", 0, 0, std::nullopt, ""),
        ParamSpec::integer("threads", 0, 0, std::nullopt, ""),
        ParamSpec::integer("prefill_chunk", 0, 0, std::nullopt, ""),
        ParamSpec::string("dtype", "f16", {"f16", "bf16"}, ""),
        ParamSpec::string("weights", "f32", {"f32", "file"}, ""),
        ParamSpec::string("kv_dtype", "auto", {"auto", "f32", "f16", "bf16"}, ""),
        ParamSpec::string("adapter", "", {}, ""), ParamSpec::real("adapter_scale", 1.0, -1000.0, 1000.0, "")};
    const toml::table* table = section(root, "model", true);
    if (table == nullptr) return;
    const ParamValues values = read_scalars(*table, "model", specs);
    model.name = values.get_string("name");
    model.page_size = values.get_int("page_size");
    model.max_context = values.get_int("max_context");
    model.threads = values.get_int("threads");
    model.prefill_chunk = values.get_int("prefill_chunk");
    model.dtype = values.get_string("dtype");
    model.weights = values.get_string("weights");
    model.kv_dtype = values.get_string("kv_dtype");
    model.adapter_scale = values.get_float("adapter_scale");
    if (const toml::node* adapter = table->get("adapter"); adapter != nullptr && adapter->is_string()) {
      const std::string given = values.get_string("adapter");
      std::error_code ec;
      model.adapter = given.empty() ? std::string() : resolve_path(given);
      if (given.empty())
        diag_.add(adapter->source(), "model.adapter", "empty: name a PEFT adapter folder or a GGUF adapter file");
      else if (!std::filesystem::exists(model.adapter, ec))
        diag_.add(adapter->source(), "model.adapter", fmt::format("{}: no such file or folder", model.adapter));
      else if (model.weights == "file")
        diag_.add(adapter->source(), "model.adapter",
                  "an adapter is merged into the float32 weights; weights = \"file\" computes from the file's "
                  "quantized blocks without it (use weights = \"f32\")");
    }
    const toml::node* name = table->get("name");
    if (name == nullptr || (name->is_string() && model.name.empty()))
      diag_.add(name ? name->source() : table->source(), "model.name",
                "missing: give a model short name (e.g. smollm2-135m), a .gguf path or a Hugging Face checkpoint folder");
    // A short name stays as written; anything that looks like a file is made absolute.
    if (model.name.find('/') != std::string::npos || ends_with(model.name, ".gguf"))
      model.name = resolve_path(model.name);
  }

  void parse_tasks(const toml::table& root, std::vector<TaskSection>& tasks) {
    const toml::node* node = root.get("task");
    if (node == nullptr) {
      diag_.add(root.source(), "task", "missing: add a [task] table (or several [[task]] tables)");
      return;
    }
    for (const auto& [table, key] : table_list(*node, "task"))
      if (auto task = parse_task(*table, key)) tasks.push_back(std::move(*task));
  }

  // The catalog name a section is about (a task's type, a method's plugin), when it is known.
  std::optional<std::string> catalog_name(const toml::table& table, std::string_view field, const std::string& key,
                                          const std::string& kind, const std::vector<std::string>& known) {
    const std::string list = known.empty() ? std::string("none found") : fmt::format("{}", fmt::join(known, ", "));
    const auto name = required_string(table, field, key, fmt::format("name the {}, one of: {}", kind, list));
    if (!name || std::find(known.begin(), known.end(), *name) != known.end()) return name;
    diag_.add(table.get(field)->source(), key + "." + std::string(field),
              fmt::format("unknown {} \"{}\" (known {}s: {})", kind, *name, kind, list));
    return std::nullopt;
  }

  std::optional<TaskSection> parse_task(const toml::table& table, const std::string& key) {
    std::vector<std::string> known;
    for (const auto& t : catalog_.tasks) known.push_back(t.name);
    const auto type = catalog_name(table, "type", key, "task", known);
    if (!type) return std::nullopt;
    const TaskInfo* info = catalog_.find_task(*type);
    TaskSection task{*type, {}};
    for (auto&& [name, node] : table) {
      if (name == "type") continue;
      const std::string full = key + "." + std::string(name.str());
      const auto spec = std::find_if(info->params.begin(), info->params.end(),
                                     [wanted = std::string(name.str())](const TaskParamSpec& p) { return p.spec.name == wanted; });
      if (spec == info->params.end()) {
        std::vector<ParamSpec> specs;
        for (const auto& p : info->params) specs.push_back(p.spec);
        diag_.add(name.source(), full, unknown_parameter("task", info->name, specs));
      } else if (auto values = task_param_values(node, *spec, full)) {
        task.params.set(spec->spec.name, std::move(*values));
      }
    }
    for (const auto& p : info->params)
      if (!task.params.has(p.spec.name)) task.params.set(p.spec.name, p.default_values());
    return task;
  }

  std::optional<std::vector<ParamValue>> task_param_values(const toml::node& node, const TaskParamSpec& param,
                                                           const std::string& key) {
    if (!param.list && node.is_array()) {
      diag_.add(node.source(), key, "takes one value, not a list (task parameters are not grid axes)");
      return std::nullopt;
    }
    auto values = convert_list(node, param.spec, key);
    if (!values || !is_path_param(param.spec)) return values;
    // Bare names such as "kjv" are corpus short names, not files.
    for (auto& value : *values) {
      auto& text = std::get<std::string>(value);
      if (text.find('/') != std::string::npos || ends_with(text, ".txt")) text = resolve_path(text);
    }
    return values;
  }

  void parse_ltt(const toml::table& root, ExperimentConfig& config) {
    static const std::vector<ParamSpec> specs = {
        ParamSpec::string("method", "", {}, ""), ParamSpec::string("parameter", "lambda", {}, ""),
        ParamSpec::string("order", "descending", {"descending", "ascending"}, ""),
        ParamSpec::string("metric", "top1_agreement", {}, ""),
        ParamSpec::real("delta", 0.1, 1e-6, 1.0 - 1e-6, ""), ParamSpec::real("epsilon", 0.1, 1e-6, 1.0 - 1e-6, ""),
        ParamSpec::integer("calibration_samples", 0, 1, 1 << 24, ""),
        ParamSpec::integer("splits", 20, 1, 100000, ""), ParamSpec::integer("seed", 0, 0, std::nullopt, ""),
        ParamSpec::string("output", "", {}, "")};
    const toml::table* table = section(root, "ltt", false);
    if (table == nullptr) return;
    const ParamValues values = read_scalars(*table, "ltt", specs);
    LttSection l;
    l.method = values.get_string("method");
    l.parameter = values.get_string("parameter");
    l.order = values.get_string("order");
    l.metric = values.get_string("metric");
    l.delta = values.get_float("delta");
    l.epsilon = values.get_float("epsilon");
    l.calibration_samples = values.get_int("calibration_samples");
    l.splits = values.get_int("splits");
    l.seed = values.get_int("seed");
    auto where = [&](const char* key) { return table->get(key) ? table->get(key)->source() : table->source(); };
    for (const char* key : {"method", "calibration_samples", "output"})
      if (table->get(key) == nullptr) diag_.add(table->source(), fmt::format("ltt.{}", key), "missing");
    if (table->get("output") != nullptr && values.get_string("output").empty())
      diag_.add(where("output"), "ltt.output", "empty: the file the certified value is written to");
    else if (!values.get_string("output").empty())
      l.output = resolve_path(values.get_string("output"));
    const int64_t least = ltt::min_calibration_size(l.delta, l.epsilon);
    if (table->get("calibration_samples") != nullptr && l.calibration_samples < least)
      diag_.add(where("calibration_samples"), "ltt.calibration_samples",
                fmt::format("{} calibration samples cannot certify a risk of {} at epsilon {}: even a risk of 0 "
                            "needs at least {} ((1 - delta)^n <= epsilon)",
                            l.calibration_samples, l.delta, l.epsilon, least));
    if (config.tasks.size() > 1)
      diag_.add(table->source(), "ltt", fmt::format("certifies over one task's samples; the config has {} tasks",
                                                    config.tasks.size()));
    if (table->get("method") != nullptr) {
      const auto m = std::find_if(config.methods.begin(), config.methods.end(),
                                  [&](const MethodSection& s) { return s.label == l.method; });
      if (m == config.methods.end()) {
        std::vector<std::string> names;
        for (const MethodSection& s : config.methods) names.push_back(s.label);
        diag_.add(where("method"), "ltt.method",
                  fmt::format("no [[method]] named \"{}\" (the config's: {})", l.method, fmt::join(names, ", ")));
      } else {
        const auto axis = m->axes.find(l.parameter);
        if (axis == m->axes.end())
          diag_.add(where("parameter"), "ltt.parameter",
                    fmt::format("method \"{}\" has no parameter \"{}\"", l.method, l.parameter));
        else if (!std::holds_alternative<double>(axis->second.front()) &&
                 !std::holds_alternative<int64_t>(axis->second.front()))
          diag_.add(where("parameter"), "ltt.parameter",
                    fmt::format("\"{}\" is not a number: its values cannot be ordered from the safest", l.parameter));
        for (const auto& [name, values_of] : m->axes)
          if (name != l.parameter && values_of.size() > 1)
            diag_.add(where("method"), "ltt.method",
                      fmt::format("method \"{}\" varies \"{}\" too: only the calibrated parameter may be a list",
                                  l.method, name));
      }
    }
    config.ltt = std::move(l);
  }

  void parse_methods(const toml::table& root, std::vector<MethodSection>& methods) {
    const toml::node* node = root.get("method");
    if (node == nullptr) return;
    for (const auto& [table, key] : table_list(*node, "method"))
      if (auto method = parse_method(*table, key)) methods.push_back(std::move(*method));
  }

  std::optional<MethodSection> parse_method(const toml::table& table, const std::string& key) {
    std::vector<std::string> known;
    for (const auto& p : catalog_.plugins) known.push_back(p.name);
    const auto plugin = catalog_name(table, "plugin", key, "plugin", known);
    if (!plugin) return std::nullopt;
    const PluginEntry* entry = catalog_.find_plugin(*plugin);
    MethodSection method{*plugin, *plugin, entry->version, {}};
    for (auto&& [name, node] : table) {
      const std::string full = key + "." + std::string(name.str());
      if (name == "plugin") continue;
      if (name == "name") {
        read_label(node, full, method.label);
        continue;
      }
      const auto spec = std::find_if(entry->params.begin(), entry->params.end(),
                                     [wanted = std::string(name.str())](const ParamSpec& s) { return s.name == wanted; });
      if (spec == entry->params.end())
        diag_.add(name.source(), full, unknown_parameter("plugin", entry->name, entry->params));
      else if (auto values = convert_list(node, *spec, full))
        method.axes[spec->name] = std::move(*values);
    }
    for (const auto& spec : entry->params)
      method.axes.try_emplace(spec.name, std::vector<ParamValue>{spec.default_value});
    return method;
  }

  void read_label(const toml::node& node, const std::string& key, std::string& label) {
    const auto* text = node.as_string();
    if (text == nullptr || text->get().empty())
      diag_.add(node.source(), key, "expected a non-empty label, got " + describe(node));
    else
      label = text->get();
  }

  std::string source_;
  Diagnostics diag_;
  const Catalog& catalog_;
  toml::source_region batch_source_;  // where experiment.batch was written
  fs::path base_dir_;
};

Result<toml::table> parse_toml(std::string_view text, const std::string& source_name) {
  const auto syntax_error = [&](const toml::parse_error& e) {
    return Error{fmt::format("{}:{}:{}: TOML syntax error: {}", source_name, e.source().begin.line,
                             e.source().begin.column, e.description())};
  };
#if TOML_EXCEPTIONS
  try {
    return toml::parse(text, std::string_view(source_name));
  } catch (const toml::parse_error& e) {
    return syntax_error(e);
  }
#else
  toml::parse_result parsed = toml::parse(text, std::string_view(source_name));
  if (!parsed) return syntax_error(parsed.error());
  return std::move(parsed).table();
#endif
}

}  // namespace

Result<ExperimentConfig> parse_experiment(std::string_view toml_text, const std::string& source_name,
                                          const Catalog& catalog) {
  auto root = parse_toml(toml_text, source_name);
  if (!root) return root.error();
  return ConfigParser(source_name, catalog).parse(*root);
}

Result<FinetuneConfig> parse_finetune_config(std::string_view toml_text, const std::string& source_name,
                                             const Catalog& catalog) {
  auto root = parse_toml(toml_text, source_name);
  if (!root) return root.error();
  return ConfigParser(source_name, catalog).parse_finetune(*root);
}

Result<FinetuneConfig> load_finetune_config(const std::filesystem::path& file, const Catalog& catalog) {
  const std::string name = file.string();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(file, ec))
    return Error{fmt::format("{}: fine-tuning config file not found", name)};
  std::ifstream in(file, std::ios::binary);
  if (!in) return Error{fmt::format("{}: cannot open the fine-tuning config for reading", name)};
  std::ostringstream text;
  text << in.rdbuf();
  auto config = parse_finetune_config(text.str(), name, catalog);
  if (config) config->path = std::filesystem::absolute(file, ec).lexically_normal().string();
  return config;
}

Result<ExperimentConfig> load_experiment(const std::filesystem::path& file, const Catalog& catalog) {
  const std::string name = file.string();
  std::error_code ec;
  if (!std::filesystem::exists(file, ec)) return Error{fmt::format("{}: experiment config file not found", name)};
  if (std::filesystem::is_directory(file, ec))
    return Error{fmt::format("{}: is a folder, not an experiment config file", name)};
  std::ifstream in(file, std::ios::binary);
  if (!in) return Error{fmt::format("{}: cannot open the experiment config for reading", name)};
  std::ostringstream text;
  text << in.rdbuf();
  auto config = parse_experiment(text.str(), name, catalog);
  if (config) config->path = std::filesystem::absolute(file, ec).lexically_normal().string();
  return config;
}

namespace {

// Floats as their shortest round-trip text, so the JSON (and so the hash)
// never depends on how a JSON library prints doubles.
nlohmann::json param_json(const ParamValue& value) {
  if (std::holds_alternative<double>(value)) return param_value_to_string(value);
  if (const auto* list = std::get_if<std::vector<double>>(&value)) {
    nlohmann::json out = nlohmann::json::array();
    for (double x : *list) out.push_back(param_value_to_string(x));
    return out;
  }
  return std::visit([](const auto& v) { return nlohmann::json(v); }, value);
}

std::string canonical_config_json(const RunSpec& run) {
  nlohmann::json task_params = nlohmann::json::object();
  for (const auto& [name, values] : run.task.params.all()) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& v : values) list.push_back(param_json(v));
    task_params[name] = std::move(list);
  }
  nlohmann::json params = nlohmann::json::object();
  for (const auto& [name, value] : run.params.all()) {
    // A file enters by its content, so an edited file makes the run pending again.
    const auto digest = run.file_digests.find(name);
    params[name] = digest != run.file_digests.end() ? nlohmann::json(digest->second) : param_json(value);
  }
  // nlohmann::json objects are std::maps: keys come out sorted.
  nlohmann::json model = {{"checksum", run.model_checksum},
                          {"page_size", run.model.page_size},
                          {"max_context", run.model.max_context},
                          {"prefill_chunk", run.model.prefill_chunk}};
  // Runs without an adapter keep the hashes they had before adapters could be merged.
  if (!run.adapter_digest.empty()) {
    model["adapter"] = run.adapter_digest;
    model["adapter_scale"] = run.model.adapter_scale;
  }
  // The element type only exists on the GPU; CPU runs keep their hashes.
  if (run.backend == "cuda") model["dtype"] = run.model.dtype;
  // Runs on the float32 weights keep the hashes they had before the choice existed.
  if (run.model.weights != "f32") model["weights"] = run.model.weights;
  // ... and CPU runs on float32 KV pages (auto or f32) those they had before half-width pages existed.
  if (run.backend != "cuda" && run.model.kv_dtype != "auto" && run.model.kv_dtype != "f32")
    model["kv_dtype"] = run.model.kv_dtype;
  nlohmann::json json = {
      {"experiment", run.experiment},
      {"measurement", kMeasurementVersion},
      {"seed", run.seed},
      {"backend", run.backend},
      // The model is identified by its checksum, not its name or path, so moving
      // a model file (or the experiment folder) keeps finished runs finished.
      {"model", std::move(model)},
      {"task", {{"type", run.task.type}, {"params", std::move(task_params)}}},
      {"plugin", {{"name", run.plugin}, {"version", run.plugin_version}}},
      {"params", std::move(params)}};
  // Runs of one sequence at a time keep the hashes they had before batches existed.
  if (run.batch != 1) json["batch"] = run.batch;
  return json.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

using Axes = std::map<std::string, std::vector<ParamValue>>;

// Every point of a method's grid: axes in the plugin's declaration order, the last one fastest.
std::vector<ParamValues> grid_points(const PluginEntry& plugin, const Axes& axes) {
  std::vector<ParamValues> points(1);
  for (const ParamSpec& spec : plugin.params) {
    const auto axis = axes.find(spec.name);
    const std::vector<ParamValue> values =
        axis != axes.end() && !axis->second.empty() ? axis->second : std::vector<ParamValue>{spec.default_value};
    std::vector<ParamValues> next;
    for (const ParamValues& point : points)
      for (const ParamValue& value : values) {
        next.push_back(point);
        next.back().set(spec.name, value);
      }
    points = std::move(next);
  }
  return points;
}

// The method label plus the axes that vary, so runs of one method tell apart.
std::string point_label(const std::string& base, const PluginEntry& plugin, const Axes& axes,
                        const ParamValues& point) {
  std::string label = base;
  for (const ParamSpec& spec : plugin.params) {
    const auto axis = axes.find(spec.name);
    if (axis != axes.end() && axis->second.size() > 1)
      label += fmt::format(" {}={}", spec.name, param_value_to_string(point.all().at(spec.name)));
  }
  return label;
}

Result<RunSpec> make_run(const ExperimentConfig& config, const std::string& checksum,
                         const std::string& adapter_digest, size_t task_index,
                         const PluginEntry& plugin, ParamValues params, std::string label, int64_t batch) {
  const TaskSection& task = config.tasks[task_index];
  RunSpec run;
  run.batch = batch;
  if (config.batch.size() > 1) label += fmt::format(" batch={}", batch);
  run.experiment = config.name;
  run.seed = config.seed;
  run.backend = config.backend;
  run.model = config.model;
  run.model_checksum = checksum;
  run.adapter_digest = adapter_digest;
  run.task = task;
  run.task_index = task_index;
  run.plugin = plugin.name;
  run.plugin_version = plugin.version;
  run.label = std::move(label);
  run.params = std::move(params);
  for (const ParamSpec& spec : plugin.params) {
    if (!run.params.has(spec.name)) continue;
    auto digest = path_digest(spec, run.params.all().at(spec.name));
    if (!digest) return Error{fmt::format("parameter {} of plugin {}: {}", spec.name, plugin.name, digest.message())};
    if (!digest->empty()) run.file_digests[spec.name] = *digest;
  }
  run.config_json = canonical_config_json(run);
  run.hash = sha256_hex(run.config_json);
  return run;
}

std::string plugin_names(const Catalog& catalog) {
  std::vector<std::string> names;
  for (const auto& p : catalog.plugins) names.push_back(p.name);
  return names.empty() ? std::string("none") : fmt::format("{}", fmt::join(names, ", "));
}

}  // namespace

Result<std::vector<RunSpec>> expand_grid(const ExperimentConfig& config, const Catalog& catalog,
                                         const std::string& model_checksum) {
  const PluginEntry* dense = catalog.find_plugin("dense");
  if (dense == nullptr)
    return Error{fmt::format("the \"dense\" plugin, every experiment's baseline, was not found (plugins found: {})",
                             plugin_names(catalog))};
  std::string adapter_digest;  // the adapter enters every run by its content
  if (!config.model.adapter.empty()) {
    auto digest = sha256_path(config.model.adapter);
    if (!digest) return Error{fmt::format("model.adapter: {}", digest.message())};
    adapter_digest = "sha256:" + *digest;
  }
  std::vector<RunSpec> runs;
  std::set<std::string> seen;
  const auto add = [&](RunSpec run) {
    if (!seen.insert(run.hash).second) return;
    run.index = int64_t(runs.size());
    runs.push_back(std::move(run));
  };
  const std::vector<int64_t> batches = config.batch.empty() ? std::vector<int64_t>{1} : config.batch;
  for (size_t task = 0; task < config.tasks.size(); ++task)
    for (const int64_t batch : batches) {
    auto baseline = make_run(config, model_checksum, adapter_digest, task, *dense, grid_points(*dense, {}).front(),
                             "dense", batch);
    if (!baseline) return baseline.error();
    baseline->baseline = true;
    add(std::move(*baseline));
    for (size_t m = 0; m < config.methods.size(); ++m) {
      const MethodSection& method = config.methods[m];
      const PluginEntry* plugin = catalog.find_plugin(method.plugin);
      if (plugin == nullptr)
        return Error{fmt::format("method[{}]: plugin \"{}\" was not found (plugins found: {})", m + 1, method.plugin,
                                 plugin_names(catalog))};
      for (ParamValues& point : grid_points(*plugin, method.axes)) {
        std::string label = point_label(method.label, *plugin, method.axes, point);
        auto run = make_run(config, model_checksum, adapter_digest, task, *plugin, std::move(point), std::move(label),
                            batch);
        if (!run) return run.error();
        add(std::move(*run));
      }
    }
    }
  return runs;
}

namespace {

std::optional<int64_t> parse_whole_number(std::string_view text) {
  int64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

}  // namespace

Result<Shard> parse_shard(const std::string& text) {
  const auto invalid = [&](const std::string& why) {
    return Error{fmt::format("\"{}\": {}; write i/N with 1 <= i <= N, e.g. 1/4", text, why)};
  };
  const size_t slash = text.find('/');
  if (slash == std::string::npos) return invalid("no '/' between the shard number and the shard count");
  const auto number = parse_whole_number(std::string_view(text).substr(0, slash));
  const auto count = parse_whole_number(std::string_view(text).substr(slash + 1));
  if (!number || !count) return invalid("the shard number and count must be whole numbers");
  if (*count < 1) return invalid("the shard count must be at least 1");
  if (*number < 1 || *number > *count) return invalid(fmt::format("the shard number must be between 1 and {}", *count));
  return Shard{*number - 1, *count};
}

std::vector<RunSpec> select_shard(const std::vector<RunSpec>& runs, Shard shard) {
  if (shard.count <= 1) return runs;
  std::vector<RunSpec> selected;
  for (const RunSpec& run : runs)
    if (run.index % shard.count == shard.index) selected.push_back(run);
  return selected;
}

Result<std::string> path_digest(const ParamSpec& spec, const ParamValue& value) {
  std::vector<std::string> paths;
  if (spec.type == ParamType::Path && !std::get<std::string>(value).empty()) paths = {std::get<std::string>(value)};
  else if (spec.type == ParamType::PathList) paths = std::get<std::vector<std::string>>(value);
  else return std::string();
  std::vector<std::string> digests;
  for (const auto& path : paths) {
    auto digest = sha256_path(path);
    if (!digest) return digest.error();
    digests.push_back("sha256:" + *digest);
  }
  if (spec.type == ParamType::Path) return digests[0];
  return fmt::format("[{}]", fmt::join(digests, ", "));
}

}  // namespace inferlab
