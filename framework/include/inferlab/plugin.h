// The plugin SDK: the only contract between the inferlab host and a method
// plugin. A plugin is a shared library that exports one factory (with
// INFERLAB_PLUGIN from inferlab/plugin_export.h) returning a `Plugin`, which
// describes itself and creates `Method` objects from resolved parameters.
//
// Mechanism lives in the engine, policy in the plugin: a Method only decides
// (which tokens to evict, which pages to read, which layers to run ...); the
// engine carries the decision out. A Method implements any subset of the hooks
// below and declares which in PluginInfo::hooks; the engine calls only those,
// from one forward schedule for every backend. A backend that lacks what a
// method needs (hooks' mechanisms, kv_page_format(), retention_policy(), weight
// replacement) refuses the method when it is set, before any token.
//
// Changing anything in this header or in params.h that affects layout or
// virtual tables requires bumping kPluginAbiVersion.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "inferlab/params.h"
#include "inferlab/result.h"

namespace inferlab {

inline constexpr int32_t kPluginAbiVersion = 15;

// Hooks, as bits of PluginInfo::hooks (docs/architecture.md has the table).
enum PluginHook : uint32_t {
  kHookLoad = 1u << 0,               // on_load: weights, calibration, cached artifacts
  kHookPrefillPattern = 1u << 1,     // prefill_pattern: sparse prefill per query head
  kHookDecodeSelection = 1u << 2,    // select_kv: which cached pages/tokens a step reads
  kHookAttentionFeedback = 1u << 3,  // on_attention: attention mass per key, head output norms
  kHookEviction = 1u << 4,           // evict: which stored tokens to drop
  kHookLayerPlan = 1u << 5,          // plan_layers / exit_after_layer: which layers run
  kHookComponentMask = 1u << 6,      // mask_components: which heads and FFN neurons to compute
  kHookPageBudget = 1u << 7,         // page_budget: read the pages with the largest key bounds
  kHookRetention = 1u << 8,          // retention_budget: the engine keeps the best-scoring tokens
  kHookCalibrate = 1u << 9,          // calibration / on_calibration / finish_calibration: dense passes before the runs
  // exit_after_layer (with kHookLayerPlan): the hidden state comes back after
  // each layer. A plan-only method (plan_layers) pays nothing per layer.
  kHookLayerExit = 1u << 10,
  kHookExitConfidence = 1u << 11,  // exit_threshold: the engine exits where its confidence passes it (ExitPolicy)
};
inline constexpr uint32_t kAllHooks = (1u << 12) - 1;

inline std::vector<std::string> hook_names(uint32_t hooks) {
  static const char* const names[] = {"load",       "prefill_pattern", "decode_selection",
                                      "attention_feedback", "eviction", "layer_plan",
                                      "component_mask",     "page_budget", "retention", "calibrate",
                                      "layer_exit", "exit_confidence"};
  std::vector<std::string> out;
  for (uint32_t i = 0; i < 12; ++i)
    if (hooks & (1u << i)) out.emplace_back(names[i]);
  return out;
}

struct ModelShape {
  int32_t n_layers = 0;
  int32_t n_heads = 0;      // query heads
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t n_embd = 0;
  int32_t n_ff = 0;
  int32_t n_vocab = 0;
  int32_t context_length = 0;
  int32_t page_size = 0;    // KV cache tokens per page
  int32_t group_size() const { return n_kv_heads > 0 ? n_heads / n_kv_heads : 0; }
};

// What a method keeps per sequence (Method::new_sequence_state): the engine
// keeps one with each sequence the method runs on, hands it to every hook of
// that sequence (StepInfo::state), copies it when the sequence is copied (a
// saved prefill) and destroys it with the sequence. Methods that keep state in
// here run correctly on interleaved sequences.
class SequenceState {
 public:
  virtual ~SequenceState() = default;
  virtual std::unique_ptr<SequenceState> clone() const = 0;
};

// One forward call of the engine over a sequence.
struct StepInfo {
  int64_t step = 0;            // forward calls made on this sequence before this one
  int32_t first_position = 0;  // position of the call's first new token
  int32_t n_tokens = 0;        // new tokens in this call
  uint64_t sequence = 0;       // the sequence this call extends (unique in the process)
  SequenceState* state = nullptr;  // this method's state for the sequence (null when it keeps none)
  // A decode step: one new token after a non-empty cache. Everything else is prefill.
  bool decode() const { return n_tokens == 1 && first_position > 0; }
};

// Read-only view of one sequence's KV cache. Stored tokens of a (layer, kv_head)
// are indexed 0..n_tokens-1 in order; stored token i lives in logical page
// i / page_size(). Keys are stored after RoPE.
class KvView {
 public:
  virtual int32_t page_size() const = 0;
  virtual int32_t n_tokens(int32_t layer, int32_t kv_head) const = 0;
  virtual std::span<const int32_t> positions(int32_t layer, int32_t kv_head) const = 0;  // original positions
  virtual const float* key(int32_t layer, int32_t kv_head, int32_t token) const = 0;     // head_dim floats
  virtual const float* value(int32_t layer, int32_t kv_head, int32_t token) const = 0;   // head_dim floats

 protected:
  ~KvView() = default;
};

// Read-only weights (float32, row-major (out, in) like GGUF). Names follow GGUF:
// per layer "attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_gate",
// "ffn_up", "ffn_down", "ffn_norm"; global (layer -1) "token_embd", "output",
// "output_norm" ("output" of a model with tied embeddings is the embedding). An
// empty span: no such tensor.
class WeightView {
 public:
  virtual std::span<const float> tensor(const std::string& name, int32_t layer) const = 0;

 protected:
  ~WeightView() = default;
};

// A low-rank adapter on one projection (LoRA): y = W x + scale * B (A x), with
// A (rank, in) and B (out, rank) float32 row-major. Unmerged, the engine runs
// two skinny GEMMs after the projection's own on every call (several adapters
// on one projection add up); merged, it folds scale * B A into this run's copy
// of W once, and a call costs what a dense one does.
struct LowRankAdapter {
  int32_t rank = 0;
  std::vector<float> a;  // (rank, in)
  std::vector<float> b;  // (out, rank)
  float scale = 1.0f;    // alpha / rank, or alpha / sqrt(rank) (rsLoRA)
  bool merge = false;
};

// Another storage of a projection's weight for one run (QLoRA's base weights):
// the engine quantizes the weight the run would use (the model's, or its
// replacement with merged adapters) when the method is installed, keeps it in
// that format only, and computes through it (a fused dequantizing GEMV for one
// row, dequantize-then-GEMM for more); unmerged adapters stay on top. Blocks of
// `block_size` values with a float32 absmax (4.5 bits per parameter at 64);
// double_quant: the absmaxes in 8 bits as well (blocks of 256 around their
// mean; 4.127 bits at 64). The 4-bit codes, as bitsandbytes stores them:
//   NF4   4-bit NormalFloat: the nearest of 16 normal quantiles in [-1, 1]
//   FP4   bitsandbytes' 4-bit float (sign, 2 exponent bits, 1 mantissa bit)
//   Int4  symmetric integers -7..7 over 7
enum class WeightFormat : int32_t { Model = 0, NF4 = 1, FP4 = 2, Int4 = 3 };
struct WeightStorage {
  WeightFormat format = WeightFormat::Model;
  int32_t block_size = 64;  // even, 2..4096
  bool double_quant = false;
};

// Weights a method changes for its own runs: the engine applies them while the
// method is set and the shared model stays untouched for every other run.
class WeightEditor {
 public:
  // Replaces projection `tensor` ("attn_q" ... "ffn_down", or "output" at layer
  // -1) of `layer` by `data`, float32 in the tensor's (out, in) layout
  // (adapters merged into it before are replaced with it).
  virtual Status replace(const std::string& tensor, int32_t layer, std::span<const float> data) = 0;
  // Adds a low-rank adapter to projection `tensor` of `layer`. A merged one
  // applies to the weight as replaced so far; an unmerged one to the weight
  // the run ends up with. The output projection takes merged adapters only.
  virtual Status add_adapter(const std::string& tensor, int32_t layer, const LowRankAdapter& adapter) = 0;
  // Adds every low-rank adapter of a PEFT LoRA folder (adapter_config.json +
  // adapter_model.safetensors) to the projections it targets, each with its
  // own scale (lora_alpha / r, or / sqrt(r) with use_rslora) times `scale`:
  // Hugging Face module names mapped to this model's tensors, lora_B of q_proj
  // and k_proj permuted as GGUF conversion permutes their rows, shapes
  // checked; refused naming the file and module, nothing added then. A GGUF
  // file instead (llama.cpp's adapter format: general.type "adapter",
  // adapter.lora.alpha, "<tensor>.weight.lora_a/lora_b") is read the same way,
  // its scale alpha / r, its rows already in GGUF's order.
  virtual Status load_adapter(const std::string& path, float scale, bool merge) = 0;
  // Stores projection `tensor` of `layer` in another format for this run
  // (WeightFormat::Model: as the model has it). The output projection, the
  // embedding and the norms keep theirs, as QLoRA keeps them.
  virtual Status set_storage(const std::string& tensor, int32_t layer, const WeightStorage& storage) = 0;

 protected:
  ~WeightEditor() = default;
};

struct LoadContext {
  ModelShape shape;
  std::string model_checksum;  // SHA-256 of the model file: key cached artifacts by it
  std::string artifact_dir;    // a folder for this plugin's cached artifacts (exists)
  const WeightView* weights = nullptr;
  WeightEditor* overrides = nullptr;  // this method's weight changes (never the shared model)
  std::string compute_dtype;          // the engine's arithmetic: "float32" (CPU), "float16" or "bfloat16" (CUDA)
};

// Decode selection: which cached tokens a step attends to, for one (layer, kv_head).
// Indices refer to tokens stored before this call, ascending, no duplicates. The
// call's own new tokens are always attended to (causally). With `heads`, each
// query head of the group attends only to the indices whose bit it has; the kv
// head reads them all (their union), and the traffic counters count that.
struct KvSelection {
  enum class Unit { Pages, Tokens };
  Unit unit = Unit::Pages;
  std::vector<int32_t> indices;  // logical page indices or stored-token indices
  // Empty: every query head of the group reads every index. Otherwise one mask
  // per index, non-zero: bit j = query head kv_head * group_size + j reads it
  // (group sizes up to 32).
  std::vector<uint32_t> heads;
};

// Attention statistics of one (layer, kv_head) for one forward call.
struct AttentionStats {
  int32_t layer = 0;
  int32_t kv_head = 0;
  // Per stored token (after this call's append): softmax probability it received,
  // summed over the query heads of the group and the call's query rows.
  std::span<const float> key_mass;
  // Per query head of the group: L2 norm of its attention output, summed over rows.
  std::span<const float> head_output_norm;
  // Per query head of the group: L1 norm (sum of |x|) of its attention output,
  // summed over rows (SpAtten's head importance).
  std::span<const float> head_output_l1;
};

// Sparse prefill for one query head (kHookPrefillPattern): which keys each
// query row of this call computes. Rows are grouped in query blocks of
// block_size stored positions; a row at stored position `self` in block
// [q0, q1) reads the keys its block's pattern allows, always only keys <= self
// (causality), and a row with no allowed key gets a zero attention output.
// The method picks the kind and the budgets; the engine estimates the indices
// of the estimated kinds from this call's own queries and keys, on the device.
//
//   Blocks         the listed (query block, key block) pairs, key blocks of
//                  block_size positions
//   VerticalSlash  MInference's vertical-slash head: the last `last_q` query
//                  rows of the call score every key they see (softmax of
//                  scale * q.k); a key column's score is the probability it got,
//                  summed over those rows, and diagonal d's score is the sum of
//                  the probabilities at (row, row - d). The `verticals` best
//                  columns and the `slashes` best diagonals are kept (columns
//                  below keep_first_columns and diagonals below
//                  keep_last_diagonals score +infinity; ties to the lower
//                  index). Diagonal d becomes the key range [q0 - d, q1 - d) of
//                  block [q0, q1) (a block-wide range along the diagonal), and
//                  overlapping ranges merge; a kept column outside every range
//                  is read on its own.
//   BlockTopK      MInference's block-sparse head: queries (this call's rows)
//                  and keys mean-pooled per block_size positions, scores = the
//                  pooled dot products (no scale, no softmax); each query block
//                  reads its `top_k` best key blocks at or before it (ties to
//                  the lower block).
//   AShape         StreamingLLM's shape: keys [0, sink) and [q0 - local, q1).
struct PrefillPattern {
  enum class Kind : int32_t { Blocks = 0, VerticalSlash = 1, BlockTopK = 2, AShape = 3 };
  int32_t block_size = 64;
  std::vector<std::pair<int32_t, int32_t>> blocks;  // Blocks: (query block, key block), key block <= query block
  Kind kind = Kind::Blocks;
  int32_t verticals = 0;             // VerticalSlash: key columns kept
  int32_t slashes = 0;               // VerticalSlash: diagonals kept
  int32_t last_q = 64;               // VerticalSlash: query rows that score them (the call's last)
  int32_t keep_first_columns = 30;   // VerticalSlash: always kept (MInference: 30)
  int32_t keep_last_diagonals = 100; // VerticalSlash: always kept (MInference: 100)
  int32_t top_k = 0;                 // BlockTopK: key blocks per query block
  int32_t sink = 0;                  // AShape: first keys
  int32_t local = 0;                 // AShape: keys before each query block
};

// How a skipped layer's KV cache is filled for the tokens that skip it.
enum class SkippedLayerKv {
  None,        // nothing is stored: later tokens never see these tokens in that layer
  FromHidden,  // K/V projected from the hidden state that skips the layer (CALM's propagation)
};

struct LayerPlan {
  std::vector<uint8_t> run;  // per layer, 1 = compute; preset to all 1
  SkippedLayerKv kv_fill = SkippedLayerKv::FromHidden;
};

// Early exit by confidence (CALM), carried out by the engine. In a decode step
// (one new token) the engine computes, after each checked layer, the policy's
// confidence in the token where the activations live (on the GPU for the CUDA
// backend: one float comes to the host); when it exceeds the call's threshold
// (Method::exit_threshold) the layers above are skipped with `kv_fill` and the
// call's logits come from the exit state, through the layer's exit head when
// it has one. Measures:
//   Softmax     top-1 minus top-2 probability of the intermediate logits: the
//               output norm and head over the hidden state (mapped by the
//               layer's exit head, when it has one). Costs an LM head per check.
//   State       cos(h_in, h_out) of the layer's input and output residual rows
//               (hidden-state saturation).
//   Classifier  softmax(W x + b)[1] of the layer's 2-way classifier.
// Exit heads and classifiers read x = h / sqrt(mean(h^2) + norm_eps), the
// residual row over its RMS without gain (as predictors do). An exit head maps
// x to W x + b, (n_embd, n_embd), before the output norm and head (a "tuned
// lens" from that layer to the last one). Multi-row calls never exit.
enum class ExitMeasure : int32_t { Softmax = 0, State = 1, Classifier = 2 };
struct ExitMap {
  std::vector<float> weight;  // (out, n_embd) row-major
  std::vector<float> bias;    // (out), or empty: none
  bool present() const { return !weight.empty(); }
};
struct ExitPolicy {
  ExitMeasure measure = ExitMeasure::Softmax;
  std::vector<uint8_t> check;        // per layer, 1 = a confidence after it (never after the last)
  std::vector<ExitMap> heads;        // per layer (out n_embd), or empty: no exit heads
  std::vector<ExitMap> classifiers;  // per checked layer (out 2) for Classifier, else empty
  float norm_eps = 1e-5f;
  SkippedLayerKv kv_fill = SkippedLayerKv::FromHidden;
  bool active() const {
    for (const uint8_t c : check)
      if (c != 0) return true;
    return false;
  }
};

// Self-speculative decoding (LayerSkip, Elhoushi et al. 2024), carried out by
// the engine's token loop. From each token the model chose, the engine drafts
// up to `draft_length` tokens greedily with the model's first `exit_layer`
// layers (their logits through the final norm and LM head; the layers above
// store no KV), takes the drafts' KV back out (Engine::truncate), runs the
// token and its drafts through every layer in one call, and keeps the drafts
// the model's own choices agree with, plus the model's next token; the other
// drafts leave the cache. The output is the model's own (its choice at every
// position comes from a full-depth row); only the work changes. Generation
// only: scoring a given text (perplexity, teacher-forced fidelity) runs every
// layer. Not with eviction or retention: a truncate cannot bring back what a
// draft step dropped.
struct Speculation {
  int32_t exit_layer = 0;    // layers a draft runs, 1..n_layers - 1; 0: no speculation
  int32_t draft_length = 0;  // drafts per verification, 1..64
  bool active() const { return exit_layer > 0; }
};

// Which parts of one layer to compute for a call. Skipped heads contribute zero
// to the attention output; skipped FFN neurons contribute zero to the FFN output.
struct ComponentMask {
  std::vector<uint8_t> heads;    // per query head, 1 = compute; preset to all 1
  bool all_neurons = true;
  std::vector<int32_t> neurons;  // when !all_neurons: FFN neurons to compute, ascending
  // Oracle selection from the call's own dense values (an upper bound for a
  // predictor; nothing is saved before the choice): > 0 keeps, per row, the
  // `oracle_neurons` neurons with the largest |silu(gate) * up| (gate and up
  // run dense; down reads only the kept neurons' columns in one-row calls) and
  // the `oracle_heads` query heads with the largest attention-output L2 norm
  // among those `heads` computes (O reads only their columns in one-row
  // calls); ties to the lower index. 0: off. Combine with `neurons` and
  // `heads` only as said: the oracle chooses among the computed heads, and
  // oracle_neurons needs all_neurons.
  int32_t oracle_neurons = 0;
  int32_t oracle_heads = 0;
};

// Engine-side retention (kHookRetention): after each layer's attention the
// engine scores every stored token where the cache lives (on the GPU for the
// CUDA backend) and keeps the first `sink` tokens, the last `recent` and the
// `heavy` best-scoring others (ties to the earlier token); the rest leave the
// cache. The method only picks the rule and the budgets.
enum class RetentionScore : int32_t {
  AccumulatedMass = 0,  // attention probability received, summed over every call so far (H2O)
  LastMass = 1,         // the probability received in the latest call only (TOVA)
};
enum class RetentionScope : int32_t {
  PerHead = 0,  // each (layer, kv head) scores and keeps its own tokens
  // One score per token of the sequence, summed over layers and kv heads; a
  // token dropped at layer l leaves every later layer too (SpAtten's cascade):
  // before a layer's attention the tokens shallower layers dropped in this
  // call leave it, and a row of this call that leaves stops being computed
  // (its query, FFN and the K/V of the layers above), so the call returns no
  // logits for it (score such runs token by token). Every kv head of a layer
  // keeps the same tokens (the budget of kv head 0); positions are original.
  PerSequence = 1,
};
struct RetentionPolicy {
  RetentionScore score = RetentionScore::AccumulatedMass;
  RetentionScope scope = RetentionScope::PerHead;
};
struct RetentionBudget {
  int32_t sink = 0;
  int32_t recent = 0;
  int32_t heavy = -1;  // < 0: keep everything after this call
};

// Local value pruning (SpAtten): each query row still scores every key it
// reads (its softmax, and the attention statistics, cover all of them) but
// accumulates P·V over only its ceil(keep * n) most probable keys (n: the keys
// the row reads; ties to the earlier key; at least one); with `renormalize`
// their probabilities are scaled to sum to 1. The V rows of the other keys are
// not read. keep >= 1: every value (off).
struct ValuePruning {
  double keep = 1.0;
  bool renormalize = false;
  bool active() const { return keep < 1.0; }
};

// How the engine selects pages by key bound (kHookPageBudget) for a kv head
// that a group of query heads shares (GQA).
enum class BoundScope : int32_t {
  // One selection per kv head: a page's score is the sum over the group's
  // query heads of each head's bound; every head attends to those pages.
  KvHead = 0,
  // Each query head selects its own `budget` pages by its own bound and
  // attends only to them; the kv head reads their union (as per-head Quest on
  // a multi-head model). Group sizes up to 32.
  QueryHead = 1,
};

// Activation sparsity (TEAL, CATS), declared once by a method and carried out
// by the engine in every call, on every row. Projections, in this order: Q, K,
// V, O, Gate, Up, Down (kSparseProjections).
//  - input_threshold[layer][p]: entries of projection p's input with
//    |x| <= threshold are zero for it, and the weight columns they would
//    multiply are not read (a one-row call reads a transposed copy of the
//    weight whose rows are those columns; a threshold of 0 skips only exact
//    zeros: the dense result). Q, K and V read the same normed input, each
//    through its own threshold. < 0: the projection is dense.
//  - gate_threshold[layer] (CATS): the gate projection runs dense; the neurons
//    with |silu(gate)| <= threshold are zero, and up and down skip them (the
//    up rows and down columns of those neurons are not read). < 0: off.
// Empty vectors: none.
inline constexpr int32_t kSparseProjections = 7;
struct ActivationSparsity {
  std::vector<std::array<float, kSparseProjections>> input_threshold;  // per layer
  std::vector<float> gate_threshold;                                   // per layer
  // Projection p's (0..6, the order above) input threshold at `layer`, and
  // the layer's gate threshold; -1 (dense) where none is given.
  float input(int32_t layer, int32_t p) const {
    return input_threshold.empty() ? -1.0f : input_threshold[size_t(layer)][size_t(p)];
  }
  float gate(int32_t layer) const { return gate_threshold.empty() ? -1.0f : gate_threshold[size_t(layer)]; }
  bool active() const {
    for (const auto& t : input_threshold)
      for (const float v : t)
        if (v >= 0) return true;
    for (const float v : gate_threshold)
      if (v >= 0) return true;
    return false;
  }
};

// Predicted components (Deja Vu): the engine runs a method's small predictors
// itself, before a layer computes, and computes only what they choose (as a
// ComponentMask with those neurons and heads would). A predictor reads a
// residual-stream row divided by its RMS, sqrt(mean(x^2) + norm_eps), with no
// gain, and scores its outputs: logits = W2 · act(W1 · x) + b2 (act: ReLU or
// the identity; rank 0: W2 · x + b2). Each row keeps its `keep` largest logits
// (NaN the smallest, ties to the lower index); a call of several rows
// computes the union of its rows' choices.
//   neurons[l]  scores layer l's FFN neurons (out = n_ff) from layer l's input;
//   heads[l]    scores layer l's query heads (out = n_heads) from layer l-1's
//               input: one layer of lookahead, as in the reference (layer 0,
//               and a layer whose previous layer did not run, read their own).
// On the CUDA backend the predictors, the top-k and the lists stay on the GPU
// (the predictors on a side stream, overlapping the main stream's work), so
// steps replay in graphs; nothing comes to the host per layer.
struct LowRankPredictor {
  int32_t keep = 0;  // outputs computed per row; 0: no predictor (dense)
  int32_t rank = 0;
  bool relu = false;
  std::vector<float> w1;  // (rank, n_embd); empty for rank 0
  std::vector<float> w2;  // (out, rank), or (out, n_embd) for rank 0
  std::vector<float> b2;  // (out), or empty: no bias
  bool present() const { return keep > 0; }
};
struct ComponentPredictors {
  std::vector<LowRankPredictor> neurons;  // per layer, or empty: none
  std::vector<LowRankPredictor> heads;    // per layer, or empty: none
  float norm_eps = 1e-5f;
  bool active() const {
    for (const auto& p : neurons)
      if (p.present()) return true;
    for (const auto& p : heads)
      if (p.present()) return true;
    return false;
  }
};

// Storage of the KV cache's pages. BitPlanes: a method's own quantized pages
// (KvQuantization), never a model-wide setting.
enum class KvPageFormat : int32_t { Any = 0, F32 = 1, F16 = 2, BF16 = 3, BitPlanes = 4 };

// Progressive quantization (SpAtten): the method's sequences store each K and
// V row on its own symmetric integer grid of msb_bits + lsb_bits bits (scale:
// the row's largest magnitude), split into an MSB plane and an LSB plane.
// Attention reads the MSB planes first (each value at the middle of its MSB
// bucket); a query row whose largest softmax probability is below
// `requant_threshold` also reads the LSB planes of its keys and values and is
// recomputed at full precision. The engine counts the rows checked and
// refetched per layer and the LSB bytes read. Planes of 1..8 (MSB) and 0..8
// (LSB) bits; msb_bits 0: off (pages as the model's KV format).
struct KvQuantization {
  int32_t msb_bits = 0;
  int32_t lsb_bits = 0;
  double requant_threshold = 0.05;
  bool active() const { return msb_bits > 0; }
};

// One layer of the model being calibrated, run on inputs a method chooses
// (finish_stored_calibration): what a greedy allocation measures each
// candidate with (TEAL's block-wise search).
class LayerProbe {
 public:
  virtual ~LayerProbe() = default;
  // Layer `layer` alone on input residual rows (rows, n_embd) taken as
  // windows of `window` consecutive tokens, each its own sequence from
  // position 0 (an activation store's rows: samples x tokens), with
  // `sparsity`'s thresholds of that layer (its other layers' are ignored;
  // none: dense); `output` gets the layer's output residual rows.
  virtual Status layer_output(int32_t layer, std::span<const float> input, int32_t window,
                              const ActivationSparsity& sparsity, std::vector<float>& output) = 0;
  // The model's prediction from residual rows (rows, n_embd) taken as final
  // hidden states: the output norm and head over each row, after `head`
  // (an ExitMap of out n_embd, reading the row over its RMS with `norm_eps`)
  // when given. Per row: the argmax token (ties to the lower id) and the
  // softmax probability of the top-1 minus the top-2 (CALM's softmax measure).
  virtual Status predict(std::span<const float> hidden, const ExitMap* head, float norm_eps,
                         std::vector<int32_t>& top1, std::vector<float>& margin) = 0;
};

// Calibration (kHookCalibrate): before a method's runs the host runs dense
// passes over `samples` windows of `tokens` tokens of a corpus ("kjv", or a
// text file's path) and hands the method, per sample and layer, the
// intermediates it asked for (`taps`), then the logits of every row. The
// method condenses them into artifacts (finish_calibration writes them into
// its artifact folder), which its on_load then reads. The artifacts are kept by
// model checksum, plugin version and the values of all its parameters: a run
// with the same three finds them and calibrates nothing.
enum CalibrationTap : uint32_t {
  kTapHiddenIn = 1u << 0,        // the layer's input residual stream (n_tokens, n_embd)
  kTapQueries = 1u << 1,         // queries after RoPE (n_tokens, n_heads * head_dim)
  kTapKeys = 1u << 2,            // keys after RoPE (n_tokens, n_kv_heads * head_dim)
  kTapAttentionOut = 1u << 3,    // attention output per head, before W_o (n_tokens, n_heads * head_dim)
  kTapFfnActivation = 1u << 4,   // silu(gate) * up (n_tokens, n_ff)
  kTapLogits = 1u << 5,          // every row's logits (n_tokens, n_vocab), after the last layer
  kTapValues = 1u << 6,          // values, as cached (n_tokens, n_kv_heads * head_dim)
  kTapAttentionIn = 1u << 7,     // the attention's normed input, read by Q, K, V (n_tokens, n_embd)
  kTapFfnIn = 1u << 8,           // the FFN's normed input, read by gate and up (n_tokens, n_embd)
  kTapFfnGate = 1u << 9,         // the gate projection, before SiLU (n_tokens, n_ff)
  kTapHiddenOut = 1u << 10,      // the layer's output residual stream (n_tokens, n_embd)
};
struct CalibrationRequest {
  std::string corpus = "kjv";  // "kv_retrieval" (built in: random UUID key-value JSON), or a text file path
  int32_t samples = 0;         // 0: no calibration
  int32_t tokens = 256;        // per sample
  uint32_t taps = 0;           // CalibrationTap bits
  // The taps go to an activation store on disk (inferlab/activations.h)
  // instead of to on_calibration: streamed sample by sample, resumable, kept
  // by model checksum, corpus, samples, tokens, taps and arithmetic (shared by
  // every method and parameter set asking for the same); the host then calls
  // finish_stored_calibration. kTapLogits is not stored.
  bool stored = false;
};
// What one layer of one calibration sample showed (empty spans: not asked for).
// layer = -1 carries the logits.
struct CalibrationTaps {
  int32_t sample = 0;
  int32_t layer = 0;
  int32_t n_tokens = 0;
  std::span<const int32_t> tokens;
  std::span<const float> hidden_in, queries, keys, attention_out, ffn_activation, logits;
  std::span<const float> values;
  std::span<const float> attention_in, ffn_in, ffn_gate;
  std::span<const float> hidden_out;
};

// The request a method's ParamSpec::calibration parameters name, for `taps`.
inline CalibrationRequest calibration_request(const ParamValues& p, uint32_t taps) {
  return {p.get_string("corpus"), int32_t(p.get_int("calibration_samples")), int32_t(p.get_int("calibration_tokens")),
          taps};
}

// Which positions RoPE gives the keys and queries of a sequence.
enum class KvPositions {
  Original,  // a token keeps its position in the sequence
  // Positions are indices in the (compacted) cache: when eviction moves a token
  // its key is re-rotated, and a new token's position is the number of tokens
  // stored before it. Sequences can then run past the model's context length
  // (StreamingLLM). Indices are per (layer, kv head).
  Cache,
};

// One configured instance of a method. The host creates one per run and calls
// begin_sequence before every sample.
class Method {
 public:
  virtual ~Method() = default;

  // kHookLoad: called once after creation, before any sequence (after calibration).
  virtual Status on_load(const LoadContext& context) { (void)context; return ok_status(); }

  // kHookCalibrate: what calibration this method wants (samples 0: none).
  virtual CalibrationRequest calibration(const ModelShape& shape) {
    (void)shape;
    return {};
  }
  // kHookCalibrate: the taps of one layer of one sample, in order.
  virtual void on_calibration(const CalibrationTaps& taps) { (void)taps; }
  // kHookCalibrate: writes the artifacts into `artifact_dir` (which exists).
  virtual Status finish_calibration(const std::string& artifact_dir) {
    (void)artifact_dir;
    return ok_status();
  }
  // kHookCalibrate with CalibrationRequest::stored: the activation store
  // (`activation_dir`, complete) is there; writes the artifacts into
  // `artifact_dir` (which exists). Called instead of on_calibration and
  // finish_calibration. `probe` runs single layers of the model on inputs
  // the method chooses (e.g. a greedy allocation measuring each candidate).
  virtual Status finish_stored_calibration(const std::string& activation_dir, const std::string& artifact_dir,
                                           LayerProbe& probe) {
    (void)activation_dir; (void)artifact_dir; (void)probe;
    return ok_status();
  }
  // Every plugin: a new sample starts (the runner calls it before each).
  virtual void begin_sequence(const ModelShape& shape) { (void)shape; }
  // Every plugin: the state it keeps for a sequence, made when it first runs on
  // one (nullptr: none). See SequenceState.
  virtual std::unique_ptr<SequenceState> new_sequence_state(const ModelShape& shape) {
    (void)shape;
    return nullptr;
  }

  // kHookPrefillPattern: return true and fill `pattern` to make this query
  // head's attention sparse for this prefill call; false computes it densely.
  virtual bool prefill_pattern(const StepInfo& step, int32_t layer, int32_t head, PrefillPattern& pattern) {
    (void)step; (void)layer; (void)head; (void)pattern;
    return false;
  }

  // kHookDecodeSelection: return true and fill `selection` to restrict which
  // cached tokens this call reads. `queries` holds the group's query rows
  // (group_size, head_dim) for the call's last new token, after RoPE.
  virtual bool select_kv(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head,
                         std::span<const float> queries, KvSelection& selection) {
    (void)step; (void)kv; (void)layer; (void)kv_head; (void)queries; (void)selection;
    return false;
  }

  // kHookPageBudget: how many KV pages (of kv.page_size() tokens) of (layer,
  // kv_head) this call reads, chosen by the engine. The engine keeps the
  // per-channel minimum and maximum of every page's keys, as tokens are stored,
  // and bounds a page's attention logits with the call's last query rows of the
  // group: sum over query heads h and channels i of max(q_hi * min_i, q_hi * max_i).
  // It reads the last page always, plus the pages with the largest bounds
  // (ties to the lower page). Return a count >= 1 (a count covering every page
  // reads them all), 0 to read every page, or a negative value to leave the
  // head to select_kv (when kHookDecodeSelection is declared) or dense. With
  // bound_scope() QueryHead, each query head of the group picks its own `count`
  // pages by its own bound instead, and the kv head reads their union.
  virtual int32_t page_budget(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head) {
    (void)step; (void)kv; (void)layer; (void)kv_head;
    return -1;
  }

  // kHookAttentionFeedback: statistics of a layer's attention, per kv head,
  // delivered after the layer's attention and before eviction.
  virtual void on_attention(const StepInfo& step, const KvView& kv, const AttentionStats& stats) {
    (void)step; (void)kv; (void)stats;
  }

  // kHookEviction: stored-token indices of (layer, kv_head) to drop, after the
  // layer's attention in every call. The engine compacts the pages and returns
  // freed pages to the pool.
  virtual void evict(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head,
                     std::vector<int32_t>& drop) {
    (void)step; (void)kv; (void)layer; (void)kv_head; (void)drop;
  }

  // kHookLayerPlan: which layers this call runs (return false to run all).
  virtual bool plan_layers(const StepInfo& step, LayerPlan& plan) { (void)step; (void)plan; return false; }
  // kHookLayerPlan: after each layer that ran, may end the call early; the
  // remaining layers are skipped with the plan's kv_fill. `hidden` is the
  // residual stream (n_embd) of the call's last token.
  virtual bool exit_after_layer(const StepInfo& step, int32_t layer, std::span<const float> hidden) {
    (void)step; (void)layer; (void)hidden;
    return false;
  }

  // kHookExitConfidence: this call's exit threshold, asked before every call
  // while exit_policy() is active: a checked layer exits when its confidence
  // exceeds it (> 1: no exit in this call; confidences never exceed 1).
  virtual double exit_threshold(const StepInfo& step) { (void)step; return 2.0; }

  // kHookComponentMask: which heads and FFN neurons of `layer` to compute;
  // `hidden` is the layer's input residual stream (n_tokens, n_embd).
  virtual bool mask_components(const StepInfo& step, int32_t layer, std::span<const float> hidden,
                               ComponentMask& mask) {
    (void)step; (void)layer; (void)hidden; (void)mask;
    return false;
  }

  // kHookRetention: how many tokens of (layer, kv_head) stay after this call;
  // asked before the call's first layer (the cache then holds what it held
  // before the call, plus step.n_tokens new tokens after the append).
  virtual RetentionBudget retention_budget(const StepInfo& step, int32_t layer, int32_t kv_head) {
    (void)step; (void)layer; (void)kv_head;
    return {};
  }
  // kHookRetention: how the engine scores tokens (read when the method is set).
  virtual RetentionPolicy retention_policy() const { return {}; }
  // kHookPageBudget: one selection per kv head, or per query head (read when
  // the method is set).
  virtual BoundScope bound_scope() const { return BoundScope::KvHead; }

  // Every plugin: local value pruning of its attention, prefill and decode
  // (read when the method is set).
  virtual ValuePruning value_pruning() const { return {}; }
  // Every plugin: the KV page format its decisions need (Any: whatever the
  // backend stores). A backend without it refuses the method before any token.
  virtual KvPageFormat kv_page_format() const { return KvPageFormat::Any; }
  // Every plugin: progressive quantization of its KV pages (read when the
  // method is set; its sequences are made in a pool of that format).
  virtual KvQuantization kv_quantization() const { return {}; }
  // Every plugin: activation sparsity of its projections (read when the method
  // is set; see ActivationSparsity).
  virtual ActivationSparsity activation_sparsity() const { return {}; }
  // Every plugin: predictors the engine runs to choose each layer's neurons
  // and heads (read when the method is set; see ComponentPredictors).
  virtual ComponentPredictors component_predictors() const { return {}; }
  // Every plugin: early exit by a confidence the engine computes (read when
  // the method is set; see ExitPolicy). Needs exit_threshold.
  virtual ExitPolicy exit_policy() const { return {}; }
  // Every plugin: self-speculative decoding (read when the method is set; see
  // Speculation).
  virtual Speculation speculation() const { return {}; }
  // Every plugin: hooks of PluginInfo::hooks this instance does not use (its
  // parameters turn them off), read when the method is set; the engine then
  // runs nothing for them (e.g. no host copy of the hidden state for a
  // mask_components that would return false).
  virtual uint32_t unused_hooks() const { return 0; }
  // Every plugin: how RoPE positions keys and queries (read once per sequence).
  virtual KvPositions kv_positions() const { return KvPositions::Original; }
  // Every plugin: true when prefill under this method is exactly dense (no hook
  // changes it and no hook needs to see it), so the host may start its samples
  // from a saved dense prefill instead of recomputing it.
  virtual bool dense_prefill() const { return false; }

  // Every plugin: what it did, accumulated since on_load (e.g. "heavy_hitters_kept").
  virtual std::map<std::string, double> counters() const { return {}; }

  // Set by the engine the first time this object is its method: sequences
  // keep this method's state under it (an address can be reused, this cannot).
  uint64_t engine_instance = 0;
};

// The hooks a Method class implements, read off what it overrides: a plugin
// declares its hooks once, by overriding them, and fills PluginInfo::hooks with
// hooks_of<MyMethod>() (so the bits cannot disagree with the code).
template <class M>
constexpr uint32_t hooks_of() {
  static_assert(std::is_base_of_v<Method, M>, "hooks_of<M>: M must derive from inferlab::Method");
#define INFERLAB_OVERRIDES(fn) (!std::is_same_v<decltype(&M::fn), decltype(&Method::fn)>)
  uint32_t hooks = 0;
  if (INFERLAB_OVERRIDES(on_load)) hooks |= kHookLoad;
  if (INFERLAB_OVERRIDES(prefill_pattern)) hooks |= kHookPrefillPattern;
  if (INFERLAB_OVERRIDES(select_kv)) hooks |= kHookDecodeSelection;
  if (INFERLAB_OVERRIDES(on_attention)) hooks |= kHookAttentionFeedback;
  if (INFERLAB_OVERRIDES(evict)) hooks |= kHookEviction;
  if (INFERLAB_OVERRIDES(plan_layers)) hooks |= kHookLayerPlan;
  if (INFERLAB_OVERRIDES(exit_after_layer)) hooks |= kHookLayerPlan | kHookLayerExit;
  if (INFERLAB_OVERRIDES(exit_threshold)) hooks |= kHookExitConfidence;
  if (INFERLAB_OVERRIDES(mask_components)) hooks |= kHookComponentMask;
  if (INFERLAB_OVERRIDES(page_budget)) hooks |= kHookPageBudget;
  if (INFERLAB_OVERRIDES(retention_budget)) hooks |= kHookRetention;
  if (INFERLAB_OVERRIDES(on_calibration) || INFERLAB_OVERRIDES(finish_stored_calibration)) hooks |= kHookCalibrate;
#undef INFERLAB_OVERRIDES
  return hooks;
}

struct PluginInfo {
  std::string name;         // what configs write as `plugin = "..."`
  std::string version;      // part of every run's hash: bump it when results change
  std::string description;  // one line
  uint32_t hooks = 0;       // PluginHook bits the Method implements: hooks_of<MyMethod>()
  std::vector<ParamSpec> params;
};

class Plugin {
 public:
  virtual ~Plugin() = default;
  virtual PluginInfo info() const = 0;
  // `params` holds every declared parameter, validated against the schema.
  virtual Result<std::unique_ptr<Method>> create(const ParamValues& params) const = 0;
};

}  // namespace inferlab
