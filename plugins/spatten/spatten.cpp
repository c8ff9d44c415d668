// SpAtten (Wang, Zhang, Han, "SpAtten: Efficient Sparse Attention Architecture
// with Cascade Token and Head Pruning", HPCA 2021), its cascade pruning:
//
//   tokens  every token's importance is the attention probability it receives,
//           summed over heads, query rows, layers and steps; after layer l
//           only the ceil(n * keep[l]) most important of the n tokens seen so
//           far stay, and a token pruned at layer l is gone for every deeper
//           layer and every later step (its K/V, and inside a prefill call its
//           row: query, FFN and the deeper layers' K/V).
//   heads   every head's importance is the L1 magnitude of its attention
//           output, summed over rows and layers (by head index); before layer
//           l the least important heads are pruned until ceil(H * head_keep[l])
//           are left, and a head pruned at layer l stays pruned in every deeper
//           layer. The pruned set of each layer is decided in a sequence's
//           first call (the prompt) and kept for its later steps.
//
// The engine carries both out (retention per sequence: scores, the cascade and
// pruned rows; head masks: a kv head whose query heads are all pruned is not
// read).
//   values  each query row accumulates P·V over only its value_keep most
//           probable keys (local value pruning); the engine scores every key
//           and reads the V rows of the kept ones.
//   quantization  (quantize = true) the sequence's K and V rows are stored
//           as bit planes, msb_bits + lsb_bits on a per-row grid; attention
//           reads the MSB planes, and a query row whose largest probability
//           is below requant_threshold refetches the LSB planes and is
//           recomputed (progressive quantization; the engine's bit-plane pages).
// The plugin only picks the schedules, fractions and widths.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "inferlab/plugin_export.h"

namespace {

using namespace inferlab;

// A given schedule's value at `layer` (1 where it names none), or for an empty
// one the default shape: 1 for the first third of the layers, falling linearly
// to `floor` over the middle third, `floor` in the last third (SpAtten's GPT-2
// traces prune little early and most late).
double schedule_at(const LayerSchedule& schedule, int32_t layer, int32_t n_layers, double floor) {
  if (!schedule.ranges.empty()) return schedule.at(layer, 1.0);
  const int32_t a = n_layers / 3, b = 2 * n_layers / 3;
  if (layer < a) return 1.0;
  if (layer >= b || b == a) return floor;
  return 1.0 - (1.0 - floor) * double(layer - a) / double(b - a);
}

// Per sequence: head importance so far and each layer's pruned heads.
struct HeadState final : SequenceState {
  std::vector<double> importance;            // (n_heads) L1 of the heads' outputs, summed over rows and layers
  std::vector<std::vector<uint8_t>> pruned;  // per layer decided so far: (n_heads) 1 = pruned
  std::unique_ptr<SequenceState> clone() const override { return std::make_unique<HeadState>(*this); }
};

class SpAtten final : public Method {
 public:
  struct Options {
    bool prune_tokens = true, prune_heads = true, prune_values = true;
    double value_keep = 0.3;
    bool renormalize = false;
    LayerSchedule keep, head_keep;  // empty: the default shape
    double keep_min = 0.3, head_keep_min = 0.75;
    int32_t recent = 1, dense_layers = 0;
    bool quantize = false;
    int32_t msb_bits = 6, lsb_bits = 4;
    double requant_threshold = 0.05;
  };
  explicit SpAtten(Options o) : o_(std::move(o)) {}
  void begin_sequence(const ModelShape& shape) override { shape_ = shape; }

  // --- values: the engine accumulates P·V over each row's most probable keys ---
  ValuePruning value_pruning() const override {
    if (!o_.prune_values) return {};
    return {o_.value_keep, o_.renormalize};
  }

  // --- quantization: the engine's bit-plane pages ---
  KvQuantization kv_quantization() const override {
    if (!o_.quantize) return {};
    return {o_.msb_bits, o_.lsb_bits, o_.requant_threshold};
  }

  // --- tokens: the engine's retention per sequence ---
  RetentionPolicy retention_policy() const override {
    return {RetentionScore::AccumulatedMass, RetentionScope::PerSequence};
  }
  RetentionBudget retention_budget(const StepInfo& step, int32_t layer, int32_t) override {
    const double keep = token_keep(layer);
    if (!o_.prune_tokens || layer < o_.dense_layers || keep >= 1.0) return RetentionBudget{};  // keep all
    const int32_t seen = step.first_position + step.n_tokens;
    const auto kept = int32_t(std::ceil(keep * double(seen)));
    return RetentionBudget{0, o_.recent, std::max(0, kept - o_.recent)};
  }

  // --- heads: importance from the attention statistics, masks per layer ---
  std::unique_ptr<SequenceState> new_sequence_state(const ModelShape& shape) override {
    shape_ = shape;
    auto s = std::make_unique<HeadState>();
    s->importance.assign(size_t(shape.n_heads), 0.0);
    return s;
  }
  void on_attention(const StepInfo& step, const KvView&, const AttentionStats& stats) override {
    auto* s = static_cast<HeadState*>(step.state);
    const int32_t gs = shape_.group_size();
    for (int32_t j = 0; j < gs && j < int32_t(stats.head_output_l1.size()); ++j)
      s->importance[size_t(stats.kv_head * gs + j)] += stats.head_output_l1[size_t(j)];
  }
  bool mask_components(const StepInfo& step, int32_t layer, std::span<const float>, ComponentMask& mask) override {
    if (!o_.prune_heads) return false;
    auto* s = static_cast<HeadState*>(step.state);
    while (int32_t(s->pruned.size()) <= layer) decide(*s, int32_t(s->pruned.size()));
    const auto& pruned = s->pruned[size_t(layer)];
    if (std::none_of(pruned.begin(), pruned.end(), [](uint8_t p) { return p != 0; })) return false;
    for (size_t h = 0; h < pruned.size(); ++h) mask.heads[h] = pruned[h] ? 0 : 1;
    return true;
  }

  std::map<std::string, double> counters() const override { return {{"heads_pruned_decided", heads_pruned_}}; }

 private:
  double token_keep(int32_t layer) const {
    return schedule_at(o_.keep, layer, shape_.n_layers, o_.keep_min);
  }
  // Layer l's pruned heads: layer l - 1's, then the least important others
  // (ties to the lower head) until ceil(H * head_keep[l]) are left.
  void decide(HeadState& s, int32_t layer) {
    const int32_t H = shape_.n_heads;
    std::vector<uint8_t> pruned = layer > 0 ? s.pruned[size_t(layer - 1)] : std::vector<uint8_t>(size_t(H), 0);
    if (layer >= o_.dense_layers) {
      const double keep = schedule_at(o_.head_keep, layer, shape_.n_layers, o_.head_keep_min);
      const auto target = int32_t(std::ceil(std::clamp(keep, 0.0, 1.0) * H));
      int32_t left = H - int32_t(std::count(pruned.begin(), pruned.end(), uint8_t{1}));
      std::vector<int32_t> order(static_cast<size_t>(H));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return s.importance[size_t(a)] < s.importance[size_t(b)]; });
      for (int32_t h : order) {
        if (left <= std::max(target, 1)) break;
        if (pruned[size_t(h)] != 0) continue;
        pruned[size_t(h)] = 1;
        --left;
        ++heads_pruned_;
      }
    }
    s.pruned.push_back(std::move(pruned));
  }

  Options o_;
  ModelShape shape_;
  double heads_pruned_ = 0;
};

class SpAttenPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    return {"spatten",
            "1.1.0",
            "cascade token and head pruning, local value pruning, progressive quantization (Wang, Zhang, Han, "
            "HPCA 2021)",
            hooks_of<SpAtten>(),
            {ParamSpec::boolean("prune_tokens", true, "cascade token pruning"),
             ParamSpec::schedule("keep", "", 0.001, 1.0,
                                 "fraction of the tokens seen so far kept after each layer, e.g. "
                                 "\"0-9=1.0; 10-19=0.6; 20-29=0.3\" (layers not named: 1.0); empty: the default "
                                 "shape (1.0 in the first third, falling to keep_min over the middle third)"),
             ParamSpec::real("keep_min", 0.3, 0.001, 1.0, "the default keep shape's last value"),
             ParamSpec::integer("recent", 1, 1, 1 << 24,
                                "newest tokens always kept (>= 1: the row whose logits a call returns)"),
             ParamSpec::boolean("prune_heads", true, "cascade head pruning"),
             ParamSpec::schedule("head_keep", "", 0.001, 1.0,
                                 "fraction of the query heads kept at each layer (layers not named: 1.0); empty: "
                                 "the default shape with head_keep_min"),
             ParamSpec::real("head_keep_min", 0.75, 0.001, 1.0, "the default head_keep shape's last value"),
             ParamSpec::boolean("prune_values", true, "local value pruning"),
             ParamSpec::real("value_keep", 0.3, 0.001, 1.0,
                             "fraction of the keys a query row reads whose values it accumulates (the most probable)"),
             ParamSpec::boolean("renormalize", false, "scale the kept probabilities to sum to 1"),
             ParamSpec::boolean("quantize", false,
                                "progressive quantization: KV rows as MSB and LSB bit planes, LSBs refetched for flat "
                                "rows"),
             ParamSpec::integer("msb_bits", 6, 2, 8, "bits of the MSB plane, read by every row"),
             ParamSpec::integer("lsb_bits", 4, 0, 8, "bits of the LSB plane, read by rows below requant_threshold"),
             ParamSpec::real("requant_threshold", 0.05, 0.0, 1.0,
                             "a query row whose largest probability is below this refetches the LSB planes"),
             ParamSpec::dense_layers(0)}};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    SpAtten::Options o;
    o.prune_tokens = p.get_bool("prune_tokens");
    o.prune_heads = p.get_bool("prune_heads");
    o.prune_values = p.get_bool("prune_values");
    o.value_keep = p.get_float("value_keep");
    o.renormalize = p.get_bool("renormalize");
    o.keep = p.get_schedule("keep");
    o.head_keep = p.get_schedule("head_keep");
    o.keep_min = p.get_float("keep_min");
    o.head_keep_min = p.get_float("head_keep_min");
    o.recent = int32_t(std::min<int64_t>(p.get_int("recent"), std::numeric_limits<int32_t>::max()));
    o.dense_layers = int32_t(std::min<int64_t>(p.get_int("dense_layers"), std::numeric_limits<int32_t>::max()));
    o.quantize = p.get_bool("quantize");
    o.msb_bits = int32_t(p.get_int("msb_bits"));
    o.lsb_bits = int32_t(p.get_int("lsb_bits"));
    o.requant_threshold = p.get_float("requant_threshold");
    return std::unique_ptr<Method>(std::make_unique<SpAtten>(std::move(o)));
  }
};

}  // namespace

INFERLAB_PLUGIN(SpAttenPlugin)
