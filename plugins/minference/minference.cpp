// MInference (Jiang et al., "MInference 1.0: Accelerating Pre-filling for
// Long-Context LLMs via Dynamic Sparse Attention", NeurIPS 2024): each query
// head's prefill attention follows one of three patterns, assigned offline
// (the pattern file, MInference's own JSON layout: pattern_file.h), with the
// indices estimated online from the call's own queries and keys by the engine
// (PrefillPattern):
//   vertical_and_slash  the `a` key columns and `b` diagonals the last
//                       `last_q` queries attend to most
//   stream_llm          the first `a` keys and a local window of `b` (A-shape)
//   block_sparse        the top `block_top_k` key blocks per query block of
//                       `kernel_block` positions, by mean-pooled scores
// Decode stays dense. Budgets in the file are absolute token counts; with
// `reference_context` > 0 they scale with the context: budget * context /
// reference_context (a file searched at 128K tokens keeps its sparsity at 8K),
// then the reference's floors apply (at least 30 verticals and 50 slashes,
// never more than the context).
#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "inferlab/plugin_export.h"
#include "pattern_file.h"
#include "search.h"

namespace {

using namespace inferlab;
using minference::HeadPattern;
using minference::HeadType;

// What the offline search measures per candidate (search.h): the attention
// mass it keeps, or how many output elements it changes by more than 5e-3.
enum class SearchMode { Off, Recall, Output };

struct Options {
  std::string config;
  bool allow_other_model = false;
  HeadType default_type = HeadType::VerticalSlash;
  int64_t vertical = 1000, slash = 6096, n_init = 128, n_local = 3968, block_top_k = 100;
  int32_t last_q = 64, kernel_block = 64, dense_layers = 0, min_context = 0;
  int64_t reference_context = 0;
  // The offline search (when no config is given).
  SearchMode search = SearchMode::Recall;
  bool relabel = false;
  std::string search_corpus = "kv_retrieval";
  int32_t search_tokens = 4096, search_samples = 1, search_skip_rows = 512, search_row_stride = 15;
};

class MInference final : public Method {
 public:
  explicit MInference(Options o) : o_(std::move(o)) {}

  // The search runs when no pattern file is given: dense passes over
  // `search_samples` prompts of `search_tokens` tokens, queries and keys of
  // every layer (and values for the output search).
  CalibrationRequest calibration(const ModelShape& shape) override {
    if (!searching()) return {};
    shape_ = shape;
    const size_t heads = size_t(shape.n_layers) * size_t(shape.n_heads);
    recall_.assign(heads, {});
    deviation_.assign(heads, {});
    const uint32_t taps = kTapQueries | kTapKeys | (o_.search == SearchMode::Output ? kTapValues : 0u);
    return {o_.search_corpus, o_.search_samples, o_.search_tokens, taps};
  }

  void on_calibration(const CalibrationTaps& taps) override {
    if (taps.layer < 0 || taps.queries.empty()) return;
    const bool output = o_.search == SearchMode::Output;
    if (output && taps.values.empty()) return;  // finish_calibration then names the layer
    const int64_t n = taps.n_tokens, hd = shape_.head_dim, qd = int64_t(shape_.n_heads) * hd;
    const int64_t kd = int64_t(shape_.n_kv_heads) * hd;
    const auto candidates = search_candidates(n, false);
    minference::SearchOptions so;
    so.block = o_.kernel_block;
    so.last_q = o_.last_q;
    so.skip_rows = o_.search_skip_rows;
    so.row_stride = o_.search_row_stride;
    for (int32_t h = 0; h < shape_.n_heads; ++h) {
      const int32_t g = h / shape_.group_size();  // GQA: the query head reads its group's kv head
      const size_t at = size_t(taps.layer) * size_t(shape_.n_heads) + size_t(h);
      const float* q = taps.queries.data() + h * hd;
      const float* k = taps.keys.data() + g * hd;
      if (output) {
        const auto d = minference::candidate_output_deviation(q, qd, k, kd, taps.values.data() + g * hd, kd, n, hd,
                                                              candidates, so);
        auto& sum = deviation_[at];
        sum.resize(d.size());
        for (size_t c = 0; c < d.size(); ++c) {
          sum[c].deviating += d[c].deviating;
          sum[c].elements += d[c].elements;
        }
      } else {
        const auto r = minference::candidate_recall(q, qd, k, kd, n, hd, candidates, so);
        auto& sum = recall_[at];
        sum.resize(r.size(), 0.0);
        for (size_t c = 0; c < r.size(); ++c) sum[c] += r[c];
      }
    }
    ++layers_seen_;
  }

  // The winners, in MInference's layout (budgets in the file's own units:
  // unscaled), into the artifact folder. The score of an entry: the mean
  // recall (recall search), or 1 - the share of its output elements off by
  // more than 5e-3 over every sample's scored rows (output search).
  Status finish_calibration(const std::string& dir) override {
    minference::PatternFile file;
    const auto candidates = search_candidates(o_.search_tokens, true);
    const double samples = double(layers_seen_) / double(std::max(1, shape_.n_layers));
    for (int32_t l = 0; l < shape_.n_layers; ++l) {
      file.layers.emplace_back();
      for (int32_t h = 0; h < shape_.n_heads; ++h) {
        const size_t at = size_t(l) * size_t(shape_.n_heads) + size_t(h);
        std::vector<double> score;
        if (o_.search == SearchMode::Output)
          for (const minference::OutputDeviation& d : deviation_[at]) score.push_back(1.0 - d.share());
        else
          for (double r : recall_[at]) score.push_back(r / samples);
        if (score.empty()) return Error{"minference search: no calibration taps for layer " + std::to_string(l)};
        file.layers.back().push_back(minference::choose(candidates, score, o_.relabel, 1.0));
      }
    }
    return minference::write_pattern_file(dir + "/patterns.json", file);
  }

  Status on_load(const LoadContext& context) override {
    shape_ = context.shape;
    patterns_.assign(size_t(shape_.n_layers),
                     std::vector<HeadPattern>(size_t(shape_.n_heads), default_pattern()));
    std::string path = o_.config;
    if (searching()) {  // the search's result, cached with the model's other artifacts
      path = context.artifact_dir + "/patterns.json";
      if (!std::filesystem::exists(path))
        return Error{"minference: no pattern file and no search result in " + context.artifact_dir +
                     " (the search runs as the plugin's calibration: `inferlab run` and `inferlab calibrate` do it; "
                     "or give config, or search = \"off\")"};
      if (!std::filesystem::exists(path + ".meta.json"))
        std::ofstream(path + ".meta.json") << nlohmann::json{{"model_checksum", context.model_checksum}}.dump() << "\n";
    }
    if (!path.empty()) {
      auto file = minference::read_pattern_file(path, shape_.n_layers, shape_.n_heads);
      if (!file.ok()) return file.error();
      if (auto s = check_model(path, context.model_checksum); !s) return s;
      patterns_ = std::move(file->layers);
    }
    heads_by_type_.fill(0);
    for (const auto& layer : patterns_)
      for (const HeadPattern& p : layer) ++heads_by_type_[size_t(p.type)];
    return ok_status();
  }

  bool prefill_pattern(const StepInfo& step, int32_t layer, int32_t head, PrefillPattern& out) override {
    if (step.decode() || layer < o_.dense_layers) return false;
    const int64_t context = int64_t(step.first_position) + step.n_tokens;
    if (context < o_.min_context || size_t(layer) >= patterns_.size()) return false;
    const HeadPattern& p = patterns_[size_t(layer)][size_t(head)];
    out.block_size = o_.kernel_block;
    switch (p.type) {
      case HeadType::VerticalSlash:
        out.kind = PrefillPattern::Kind::VerticalSlash;
      {
        const auto [verticals, slashes] = minference::vertical_slash_run_counts(scaled(p.a, context),
                                                                                scaled(p.b, context), context);
        out.verticals = int32_t(verticals);
        out.slashes = int32_t(slashes);
        out.last_q = o_.last_q;
        break;
      }
      case HeadType::StreamLlm:
        out.kind = PrefillPattern::Kind::AShape;
        out.sink = int32_t(std::min(context, scaled(p.a, context)));
        out.local = int32_t(std::min(context, scaled(p.b, context)));
        break;
      case HeadType::BlockSparse:
        out.kind = PrefillPattern::Kind::BlockTopK;
        out.top_k = int32_t(std::min<int64_t>(std::max<int64_t>(1, scaled(o_.block_top_k, context)),
                                              std::numeric_limits<int32_t>::max()));
        break;
    }
    ++sparse_heads_;
    return true;
  }

  std::map<std::string, double> counters() const override {
    return {{"heads_vertical_and_slash", double(heads_by_type_[0])},
            {"heads_stream_llm", double(heads_by_type_[1])},
            {"heads_block_sparse", double(heads_by_type_[2])},
            {"sparse_head_calls", double(sparse_heads_)}};
  }

 private:
  bool searching() const { return o_.config.empty() && o_.search != SearchMode::Off; }

  // The reference's candidates: `file_units` as they are written, else scaled
  // to a prompt of n tokens as the budgets are at run time.
  std::vector<minference::Candidate> search_candidates(int64_t n, bool file_units) const {
    const double scale = file_units || o_.reference_context <= 0 ? 1.0 : double(n) / double(o_.reference_context);
    if (!file_units) return minference::run_candidates(scale, n, o_.kernel_block);
    auto c = minference::reference_candidates(scale, n, o_.kernel_block);
    c.back() = {HeadType::BlockSparse, 8, 1};  // the reference writes its 1/8 ratio
    return c;
  }

  HeadPattern default_pattern() const {
    switch (o_.default_type) {
      case HeadType::StreamLlm: return {HeadType::StreamLlm, o_.n_init, o_.n_local, 0.0};
      case HeadType::BlockSparse: return {HeadType::BlockSparse, o_.block_top_k, 0, 0.0};
      case HeadType::VerticalSlash: break;
    }
    return {HeadType::VerticalSlash, o_.vertical, o_.slash, 0.0};
  }

  int64_t scaled(int64_t budget, int64_t context) const {
    if (o_.reference_context <= 0) return budget;
    return int64_t(std::ceil(double(budget) * double(context) / double(o_.reference_context)));
  }

  // A file this plugin's search wrote carries the model it was searched on
  // (NAME.meta.json beside it); a file without one (the reference's) is taken
  // on its shape alone.
  Status check_model(const std::string& path, const std::string& checksum) const {
    const std::string meta_path = path + ".meta.json";
    if (!std::filesystem::exists(meta_path)) return ok_status();
    std::ifstream in(meta_path);
    nlohmann::json meta;
    try {
      in >> meta;
    } catch (const nlohmann::json::exception& e) {
      return Error{meta_path + ": not valid JSON (" + e.what() + ")"};
    }
    const std::string searched = meta.value("model_checksum", std::string());
    if (!searched.empty() && searched != checksum && !o_.allow_other_model)
      return Error{path + ": searched on another model (checksum " + searched.substr(0, 12) + "..., this one " +
                   checksum.substr(0, 12) + "...); set allow_other_model = true to use it anyway"};
    return ok_status();
  }

  Options o_;
  ModelShape shape_;
  std::vector<std::vector<HeadPattern>> patterns_;
  std::array<int64_t, 3> heads_by_type_{};
  int64_t sparse_heads_ = 0;
  // The search, per (layer, head), per candidate, summed over samples: the
  // recall search's recall, the output search's deviating elements.
  std::vector<std::vector<double>> recall_;
  std::vector<std::vector<minference::OutputDeviation>> deviation_;
  int64_t layers_seen_ = 0;
};

SearchMode parse_search(const std::string& s) {
  if (s == "recall") return SearchMode::Recall;
  if (s == "output") return SearchMode::Output;
  return SearchMode::Off;
}

HeadType parse_type(const std::string& s) {
  if (s == "stream_llm") return HeadType::StreamLlm;
  if (s == "block_sparse") return HeadType::BlockSparse;
  return HeadType::VerticalSlash;
}

class MInferencePlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    const double big = double(std::numeric_limits<int32_t>::max());
    return {"minference",
            "1.1.0",
            "dynamic sparse prefill: vertical-slash, A-shape and block-sparse heads (Jiang et al. 2024)",
            hooks_of<MInference>(),
            {ParamSpec::path("config", "pattern file in MInference's JSON layout (none: every head default_pattern)"),
             ParamSpec::boolean("allow_other_model", false,
                                "use a pattern file searched on another model (its .meta.json names the model)"),
             ParamSpec::string("default_pattern", "vertical_and_slash", {"vertical_and_slash", "stream_llm", "block_sparse"},
                               "every head's pattern when no config is given"),
             ParamSpec::integer("vertical", 1000, 0, big, "default vertical_and_slash: key columns kept"),
             ParamSpec::integer("slash", 6096, 0, big, "default vertical_and_slash: diagonals kept"),
             ParamSpec::integer("n_init", 128, 0, big, "default stream_llm: first tokens kept"),
             ParamSpec::integer("n_local", 3968, 0, big, "default stream_llm: local window"),
             ParamSpec::integer("block_top_k", 100, 1, big, "block_sparse: key blocks kept per query block"),
             ParamSpec::integer("last_q", 64, 1, big, "vertical_and_slash: query rows (the last) that estimate the indices"),
             ParamSpec::integer("kernel_block", 64, 1, 4096, "query (and key) block size of the sparse kernel"),
             ParamSpec::integer("reference_context", 0, 0, big,
                                "budgets scale by context / reference_context (0: as written)"),
             ParamSpec::integer("min_context", 0, 0, big, "prefills with fewer tokens (context) stay dense"),
             ParamSpec::dense_layers(0),
             ParamSpec::string("search", "recall", {"recall", "output", "off"},
                               "no config: search each head's pattern by attention recall, or by the fewest attention "
                               "output elements off by more than 5e-3 (off: default_pattern)"),
             ParamSpec::boolean("relabel", false,
                                "the reference's relabelling: stream_llm and block_sparse winners become vertical_and_slash"),
             ParamSpec::string("search_corpus", "kv_retrieval", {},
                               "search prompts: kv_retrieval (built in), kjv, or a text file"),
             ParamSpec::integer("search_tokens", 4096, 256, big, "tokens per search prompt"),
             ParamSpec::integer("search_samples", 1, 1, 64, "search prompts"),
             ParamSpec::integer("search_skip_rows", 512, 0, big, "the search scores the rows from this one on"),
             ParamSpec::integer("search_row_stride", 15, 1, big,
                                "output search: every search_row_stride-th of those rows (recall: every row)")}};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    Options o;
    o.config = p.get_string("config");
    o.allow_other_model = p.get_bool("allow_other_model");
    o.default_type = parse_type(p.get_string("default_pattern"));
    o.vertical = p.get_int("vertical");
    o.slash = p.get_int("slash");
    o.n_init = p.get_int("n_init");
    o.n_local = p.get_int("n_local");
    o.block_top_k = p.get_int("block_top_k");
    o.last_q = int32_t(p.get_int("last_q"));
    o.kernel_block = int32_t(p.get_int("kernel_block"));
    o.reference_context = p.get_int("reference_context");
    o.min_context = int32_t(p.get_int("min_context"));
    o.dense_layers = int32_t(std::min<int64_t>(p.get_int("dense_layers"), std::numeric_limits<int32_t>::max()));
    o.search = parse_search(p.get_string("search"));
    o.relabel = p.get_bool("relabel");
    o.search_corpus = p.get_string("search_corpus");
    o.search_tokens = int32_t(p.get_int("search_tokens"));
    o.search_samples = int32_t(p.get_int("search_samples"));
    o.search_skip_rows = int32_t(p.get_int("search_skip_rows"));
    o.search_row_stride = int32_t(p.get_int("search_row_stride"));
    return std::unique_ptr<Method>(std::make_unique<MInference>(std::move(o)));
  }
};

}  // namespace

INFERLAB_PLUGIN(MInferencePlugin)
