#include "finetune/lora_graph.h"

#include "finetune/lora_graph_device.h"

#include <cblas.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>

#include "cpu/backward.h"
#include "cpu/cpu_ops.h"
#include "counter_rng.h"
#include "cpu/quant4.h"

namespace inferlab::finetune {

namespace cpu = kernels::cpu;

int slot_of(const std::string& tensor) {
  for (int s = 0; s < kSlots; ++s)
    if (tensor == kSlotTensors[size_t(s)]) return s;
  return -1;
}

namespace detail {

std::pair<int64_t, int64_t> slot_shape(const ModelConfig& c, int slot) {
  const int64_t d = c.n_embd, q = c.q_dim(), kv = c.kv_dim(), f = c.n_ff;
  switch (slot) {
    case 0: return {q, d};
    case 1: return {kv, d};
    case 2: return {kv, d};
    case 3: return {d, q};
    case 4: return {f, d};
    case 5: return {f, d};
    default: return {d, f};
  }
}

const WeightVector& slot_weight(const LayerWeights& w, int slot) {
  switch (slot) {
    case 0: return w.wq;
    case 1: return w.wk;
    case 2: return w.wv;
    case 3: return w.wo;
    case 4: return w.w_gate;
    case 5: return w.w_up;
    default: return w.w_down;
  }
}

uint64_t dropout_key(uint64_t seed, int ai) { return kernels::splitmix64(seed ^ kernels::splitmix64(uint64_t(ai) + 1)); }

Result<CallShape> check_call(const ModelConfig& c, const Batch& b, const AdapterSet& adapters, const AdapterGrads* g) {
  const auto fail = [](const std::string& what) -> Error { return Error{"fine-tuning batch: " + what}; };
  if (b.sequences <= 0 || b.seq_len <= 0)
    return fail(fmt::format("{} sequences of {} tokens: both must be positive", b.sequences, b.seq_len));
  if (b.seq_len > c.context_length)
    return fail(fmt::format("sequence length {} exceeds the model's context of {}", b.seq_len, c.context_length));
  for (int32_t l = 0; l < c.n_layers; ++l)  // the training attention is plain causal
    if (c.window(l) > 0 && b.seq_len > c.window(l))
      return fail(fmt::format("sequence length {} exceeds layer {}'s sliding window of {} (training attention has "
                              "no window yet)", b.seq_len, l, c.window(l)));
  const size_t rows = size_t(b.sequences * b.seq_len);
  if (b.tokens.size() != rows || b.targets.size() != rows)
    return fail(fmt::format("{} tokens and {} targets for {} x {} positions", b.tokens.size(), b.targets.size(),
                            b.sequences, b.seq_len));
  for (size_t i = 0; i < rows; ++i) {
    if (b.tokens[i] < 0 || b.tokens[i] >= c.n_vocab)
      return fail(fmt::format("token {} at position {} is outside the vocabulary of {}", b.tokens[i], i, c.n_vocab));
    if (b.targets[i] < -1 || b.targets[i] >= c.n_vocab)
      return fail(fmt::format("target {} at position {} is outside the vocabulary of {}", b.targets[i], i,
                              c.n_vocab));
  }
  CallShape shape;
  auto& index = shape.index;
  index.assign(size_t(c.n_layers), {});
  for (auto& row : index) row.fill(-1);
  for (size_t i = 0; i < adapters.adapters.size(); ++i) {
    const AdapterTensor& t = adapters.adapters[i];
    if (t.layer < 0 || t.layer >= c.n_layers || t.slot < 0 || t.slot >= kSlots)
      return fail(fmt::format("adapter {} names layer {} slot {}, not in the model", i, t.layer, t.slot));
    const auto dims = slot_shape(c, t.slot);
    const int64_t out = dims.first, in = dims.second;
    if (t.in != in || t.out != out || t.rank <= 0 || t.a.size() != size_t(t.rank * in) ||
        t.b.size() != size_t(out * t.rank))
      return fail(fmt::format("adapter {} ({} of layer {}) has shape ({}, {}) rank {} with {} A and {} B values; "
                              "the projection is ({}, {})",
                              i, kSlotTensors[size_t(t.slot)], t.layer, t.out, t.in, t.rank, t.a.size(), t.b.size(),
                              out, in));
    if (index[size_t(t.layer)][size_t(t.slot)] >= 0)
      return fail(fmt::format("two adapters on {} of layer {}", kSlotTensors[size_t(t.slot)], t.layer));
    index[size_t(t.layer)][size_t(t.slot)] = int(i);
    if (g && (g->a.size() != adapters.adapters.size() || g->a[i].size() != t.a.size() ||
              g->b[i].size() != t.b.size()))
      return fail("the gradients are not shaped like the adapters (make them with AdapterGrads::like)");
  }
  if (!b.skip.empty() && b.skip.size() != rows * size_t(c.n_layers))
    return fail(fmt::format("{} skip flags for {} positions x {} layers", b.skip.size(), rows, c.n_layers));
  shape.batch = b.sequences, shape.seq_len = b.seq_len, shape.rows = int64_t(rows);
  shape.positions.resize(rows);
  for (size_t i = 0; i < rows; ++i) shape.positions[i] = int32_t(int64_t(i) % b.seq_len);
  return shape;
}

}  // namespace detail

namespace {

using detail::slot_shape;
using detail::slot_weight;

int64_t floats_bytes(const std::vector<float>& v) { return int64_t(v.size() * sizeof(float)); }

// What a layer's forward keeps for its backward.
struct LayerActs {
  std::vector<float> x, inv1, h1, q, k, v, lse, o, x2, inv2, h2, g, u, act;
  std::array<std::vector<float>, kSlots> xa;  // x A^T of each adapter (rows, rank)
  int64_t bytes() const {
    int64_t n = 0;
    for (const auto* t : {&x, &inv1, &h1, &q, &k, &v, &lse, &o, &x2, &inv2, &h2, &g, &u, &act}) n += floats_bytes(*t);
    for (const auto& t : xa) n += floats_bytes(t);
    return n;
  }
};

}  // namespace

int64_t AdapterSet::parameter_count() const {
  int64_t n = 0;
  for (const auto& a : adapters) n += int64_t(a.a.size() + a.b.size());
  return n;
}

Result<AdapterSet> init_adapters(const ModelConfig& c, const AdapterInit& init) {
  if (init.rank <= 0) return Error{fmt::format("adapters: rank must be positive, got {}", init.rank)};
  if (!(init.alpha > 0)) return Error{fmt::format("adapters: alpha must be positive, got {}", init.alpha)};
  if (init.slots.empty()) return Error{"adapters: no target projection"};
  std::vector<bool> slot_on(kSlots, false), layer_on(size_t(c.n_layers), init.layers.empty());
  for (int s : init.slots) {
    if (s < 0 || s >= kSlots) return Error{fmt::format("adapters: no projection slot {}", s)};
    slot_on[size_t(s)] = true;
  }
  for (int32_t l : init.layers) {
    if (l < 0 || l >= c.n_layers)
      return Error{fmt::format("adapters: layer {} is outside the model's {} layers", l, c.n_layers)};
    layer_on[size_t(l)] = true;
  }
  const float scale = float(init.rslora ? init.alpha / std::sqrt(double(init.rank)) : init.alpha / init.rank);
  AdapterSet set;
  std::mt19937_64 rng(init.seed);
  for (int32_t l = 0; l < c.n_layers; ++l) {
    if (!layer_on[size_t(l)]) continue;
    for (int s = 0; s < kSlots; ++s) {
      if (!slot_on[size_t(s)]) continue;
      const auto shape = slot_shape(c, s);
      const int64_t out = shape.first, in = shape.second;
      if (init.rank > std::min(out, in))
        return Error{fmt::format("adapters: rank {} exceeds {}'s smaller side {}", init.rank, kSlotTensors[size_t(s)],
                                 std::min(out, in))};
      AdapterTensor t;
      t.layer = l, t.slot = s, t.rank = init.rank, t.scale = scale, t.in = in, t.out = out;
      t.a.resize(size_t(int64_t(init.rank) * in));
      t.b.assign(size_t(out * int64_t(init.rank)), 0.0f);
      const float bound = 1.0f / std::sqrt(float(in));
      for (float& v : t.a) v = (2.0f * kernels::unit_float24(rng()) - 1.0f) * bound;
      set.adapters.push_back(std::move(t));
    }
  }
  return set;
}

std::vector<peft::ProjectionAdapter> to_projection_adapters(const AdapterSet& set) {
  std::vector<peft::ProjectionAdapter> out;
  for (const auto& t : set.adapters) {
    peft::ProjectionAdapter p;
    p.tensor = kSlotTensors[size_t(t.slot)];
    p.layer = t.layer;
    p.adapter.rank = t.rank;
    p.adapter.a = t.a;
    p.adapter.b = t.b;
    p.adapter.scale = t.scale;
    out.push_back(std::move(p));
  }
  return out;
}

Result<AdapterSet> from_projection_adapters(const ModelConfig& c, const std::vector<peft::ProjectionAdapter>& list) {
  AdapterSet set;
  for (const auto& p : list) {
    const int s = slot_of(p.tensor);
    if (s < 0) return Error{fmt::format("adapters: {} is not a layer projection fine-tuning trains", p.tensor)};
    if (p.layer < 0 || p.layer >= c.n_layers)
      return Error{fmt::format("adapters: {} of layer {} is outside the model's {} layers", p.tensor, p.layer,
                               c.n_layers)};
    const auto shape = slot_shape(c, s);
    const int64_t out = shape.first, in = shape.second;
    const int32_t r = p.adapter.rank;
    if (r <= 0 || p.adapter.a.size() != size_t(int64_t(r) * in) || p.adapter.b.size() != size_t(out * int64_t(r)))
      return Error{fmt::format("adapters: {} of layer {}: rank {} with {} A and {} B values does not fit ({}, {})",
                               p.tensor, p.layer, r, p.adapter.a.size(), p.adapter.b.size(), out, in)};
    AdapterTensor t;
    t.layer = p.layer, t.slot = s, t.rank = r, t.scale = p.adapter.scale, t.in = in, t.out = out;
    t.a = p.adapter.a;
    t.b = p.adapter.b;
    set.adapters.push_back(std::move(t));
  }
  std::sort(set.adapters.begin(), set.adapters.end(),
            [](const AdapterTensor& x, const AdapterTensor& y) { return std::pair(x.layer, x.slot) < std::pair(y.layer, y.slot); });
  return set;
}

AdapterGrads AdapterGrads::like(const AdapterSet& set) {
  AdapterGrads g;
  for (const auto& t : set.adapters) {
    g.a.emplace_back(t.a.size(), 0.0f);
    g.b.emplace_back(t.b.size(), 0.0f);
  }
  return g;
}

void AdapterGrads::zero() {
  for (auto& v : a) std::fill(v.begin(), v.end(), 0.0f);
  for (auto& v : b) std::fill(v.begin(), v.end(), 0.0f);
}

struct LoraGraph::Impl {
  std::shared_ptr<const Model> model;
  ModelConfig c;
  GraphOptions opt;
  std::vector<std::array<cpu::Quant4Tensor, kSlots>> quant;  // 4-bit base, per layer and slot
  std::vector<float> dequant;                                 // one projection, dequantized for a GEMM
  MemoryStats mem;

  // Per call.
  const AdapterSet* set = nullptr;
  AdapterGrads* grads = nullptr;
  std::vector<std::array<int, kSlots>> index;  // adapter of (layer, slot), or -1
  std::vector<int32_t> positions;
  int64_t n = 0;  // rows
  int64_t batch = 0, seq_len = 0;
  bool dropout = false;
  uint64_t dropout_seed = 0;
  std::vector<float> dropped;  // an adapter's input after dropout
  const std::vector<uint8_t>* skip = nullptr;  // the batch's

  const float* weight(int32_t l, int s) {
    if (quant.empty()) return slot_weight(model->weights().layers[size_t(l)], s).data();
    const cpu::Quant4Tensor& t = quant[size_t(l)][size_t(s)];
    dequant.resize(size_t(t.rows * t.cols));
    cpu::quant4_dequantize(t, dequant.data());
    return dequant.data();
  }

  // The adapter's input: x itself, or x with PEFT's dropout (kept elements
  // scaled by 1 / (1 - p)), its mask a function of the seed, adapter and element.
  const float* adapter_input(int ai, const float* x, int64_t in) {
    if (!dropout) return x;
    dropped.resize(size_t(n * in));
    const DropoutMask mask = dropout_mask(ai);
#pragma omp parallel for if (n * in > 65536)
    for (int64_t e = 0; e < n * in; ++e) dropped[size_t(e)] = x[e] * mask.factor(e);
    return dropped.data();
  }

  // Adapter ai's mask: element e is kept (and scaled by 1 / (1 - p)) when a
  // uniform draw from (seed, adapter, e) is at least p.
  struct DropoutMask {
    uint64_t key;
    float p, keep_scale;
    float factor(int64_t e) const { return kernels::dropout_factor(key, e, p, keep_scale); }
  };
  DropoutMask dropout_mask(int ai) const {
    return {detail::dropout_key(dropout_seed, ai), opt.dropout, 1.0f / (1.0f - opt.dropout)};
  }

  // y(n, out) = x W^T, plus the adapter's scale * (x A^T) B^T with x A^T kept in xa.
  void linear(int32_t l, int s, const float* x, std::vector<float>& y, std::vector<float>& xa) {
    const auto shape = slot_shape(c, s);
    const int64_t out = shape.first, in = shape.second;
    y.resize(size_t(n * out));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(out), int(in), 1.0f, x, int(in), weight(l, s),
                int(in), 0.0f, y.data(), int(out));
    const int ai = index[size_t(l)][size_t(s)];
    if (ai < 0) {
      xa.clear();
      return;
    }
    const AdapterTensor& t = set->adapters[size_t(ai)];
    const float* xin = adapter_input(ai, x, in);
    xa.resize(size_t(n * t.rank));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), t.rank, int(in), 1.0f, xin, int(in), t.a.data(),
                int(in), 0.0f, xa.data(), t.rank);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(out), t.rank, t.scale, xa.data(), t.rank,
                t.b.data(), t.rank, 1.0f, y.data(), int(out));
  }

  // dx(n, in) (=, or += when accumulate) from dy(n, out); the adapter's A and B
  // gradients added to grads.
  void linear_backward(int32_t l, int s, const float* dy, const float* x, const std::vector<float>& xa, float* dx,
                       bool accumulate, std::vector<float>& tmp) {
    const auto shape = slot_shape(c, s);
    const int64_t out = shape.first, in = shape.second;
    cpu::matmul_dy_w(dx, dy, weight(l, s), n, out, in, accumulate);
    const int ai = index[size_t(l)][size_t(s)];
    if (ai < 0) return;
    const AdapterTensor& t = set->adapters[size_t(ai)];
    // dB += scale dy^T (x A^T); t = scale (dy B); dA += t^T x; dx += t A (through the dropout mask).
    cpu::matmul_dyt_x_add(grads->b[size_t(ai)].data(), dy, xa.data(), n, out, t.rank, t.scale);
    std::vector<float> dyb(size_t(n * t.rank));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), t.rank, int(out), t.scale, dy, int(out),
                t.b.data(), t.rank, 0.0f, dyb.data(), t.rank);
    const float* xin = adapter_input(ai, x, in);
    cpu::matmul_dyt_x_add(grads->a[size_t(ai)].data(), dyb.data(), xin, n, t.rank, in, 1.0f);
    if (!dropout) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(in), t.rank, 1.0f, dyb.data(), t.rank,
                  t.a.data(), int(in), 1.0f, dx, int(in));
      return;
    }
    tmp.resize(size_t(n * in));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(in), t.rank, 1.0f, dyb.data(), t.rank,
                t.a.data(), int(in), 0.0f, tmp.data(), int(in));
    // Through the mask again: the adapter saw x[e] * factor(e).
    const DropoutMask mask = dropout_mask(ai);
#pragma omp parallel for if (n * in > 65536)
    for (int64_t e = 0; e < n * in; ++e) dx[e] += tmp[size_t(e)] * mask.factor(e);
  }

  // One layer from a.x; its output (the next layer's input) into out.
  void forward_layer(int32_t l, LayerActs& a, std::vector<float>& out) {
    const LayerWeights& w = model->weights().layers[size_t(l)];
    const int64_t d = c.n_embd, f = c.n_ff;
    norm(a.x, w.attn_norm.data(), a.h1, a.inv1);
    linear(l, 0, a.h1.data(), a.q, a.xa[0]);
    linear(l, 1, a.h1.data(), a.k, a.xa[1]);
    linear(l, 2, a.h1.data(), a.v, a.xa[2]);
    if (c.qkv_bias) {  // frozen: no gradient, and none changes on the way back
      cpu::add_row_bias(a.q.data(), w.bq.data(), n, c.q_dim());
      cpu::add_row_bias(a.k.data(), w.bk.data(), n, c.kv_dim());
      cpu::add_row_bias(a.v.data(), w.bv.data(), n, c.kv_dim());
    }
    cpu::rope(a.q.data(), n, c.n_heads, c.head_dim, c.rope_dim, positions.data(), c.rope_theta, c.rope_neox, c.rope());
    cpu::rope(a.k.data(), n, c.n_kv_heads, c.head_dim, c.rope_dim, positions.data(), c.rope_theta, c.rope_neox, c.rope());
    a.o.resize(size_t(n * c.q_dim()));
    a.lse.resize(size_t(batch * c.n_heads * seq_len));
    cpu::causal_attention_forward(a.q.data(), a.k.data(), a.v.data(), a.o.data(), a.lse.data(), batch, seq_len,
                                  c.n_heads, c.n_kv_heads, c.head_dim, 1.0f / std::sqrt(float(c.head_dim)));
    linear(l, 3, a.o.data(), a.x2, a.xa[3]);
    if (c.o_bias) cpu::add_row_bias(a.x2.data(), w.bo.data(), n, d);
    cpu::add_inplace(a.x2.data(), a.x.data(), n, d);
    norm(a.x2, w.ffn_norm.data(), a.h2, a.inv2);
    linear(l, 4, a.h2.data(), a.g, a.xa[4]);
    linear(l, 5, a.h2.data(), a.u, a.xa[5]);
    a.act = a.g;
    cpu::silu_mul(a.act.data(), a.u.data(), n, f);
    linear(l, 6, a.act.data(), out, a.xa[6]);
    cpu::add_inplace(out.data(), a.x2.data(), n, d);
    if (skips_layer(l))
      for (int64_t r = 0; r < n; ++r)
        if (skips(r, l)) std::memcpy(out.data() + r * d, a.x.data() + r * d, size_t(d) * sizeof(float));
  }

  // Batch::skip: whether row r skips layer l; whether any row skips layer l.
  bool skips(int64_t r, int32_t l) const { return !skip->empty() && (*skip)[size_t(r * c.n_layers + l)] != 0; }
  bool skips_layer(int32_t l) const {
    if (skip->empty()) return false;
    for (int64_t r = 0; r < n; ++r)
      if (skips(r, l)) return true;
    return false;
  }
  // g with the rows that skip layer l zeroed: what the layer's branches see.
  const float* masked(int32_t l, const std::vector<float>& g, std::vector<float>& buffer) const {
    if (!skips_layer(l)) return g.data();
    buffer = g;
    const int64_t d = c.n_embd;
    for (int64_t r = 0; r < n; ++r)
      if (skips(r, l)) std::fill_n(buffer.data() + r * d, d, 0.0f);
    return buffer.data();
  }

  struct BackwardBuffers {
    std::vector<float> dx2, dact, dg, du, dh, dout, dq, dk, dv, tmp, upstream;
    int64_t bytes() const {
      int64_t b = 0;
      for (const auto* t : {&dx2, &dact, &dg, &du, &dh, &dout, &dq, &dk, &dv, &tmp, &upstream}) b += floats_bytes(*t);
      return b;
    }
  };

  // dx: the gradient of the layer's output in, of its input out.
  void backward_layer(int32_t l, const LayerActs& a, std::vector<float>& dx, BackwardBuffers& bb) {
    const LayerWeights& w = model->weights().layers[size_t(l)];
    const int64_t d = c.n_embd, f = c.n_ff, qd = c.q_dim(), kvd = c.kv_dim();
    bb.dx2 = dx;  // the residual around the FFN (rows that skip the layer: their whole gradient)
    bb.dact.resize(size_t(n * f));
    linear_backward(l, 6, masked(l, dx, bb.upstream), a.act.data(), a.xa[6], bb.dact.data(), false, bb.tmp);
    bb.dg.resize(size_t(n * f));
    bb.du.resize(size_t(n * f));
    cpu::silu_mul_backward(bb.dg.data(), bb.du.data(), bb.dact.data(), a.g.data(), a.u.data(), n * f);
    bb.dh.resize(size_t(n * d));
    linear_backward(l, 4, bb.dg.data(), a.h2.data(), a.xa[4], bb.dh.data(), false, bb.tmp);
    linear_backward(l, 5, bb.du.data(), a.h2.data(), a.xa[5], bb.dh.data(), true, bb.tmp);
    cpu::rmsnorm_backward(bb.dx2.data(), bb.dh.data(), a.x2.data(), a.inv2.data(), w.ffn_norm.data(), n, d, true);
    bb.dout.resize(size_t(n * qd));
    // Rows that skip the layer: nothing reaches the attention branch from their output.
    const float* attn_upstream = masked(l, bb.dx2, bb.upstream);
    linear_backward(l, 3, attn_upstream, a.o.data(), a.xa[3], bb.dout.data(), false, bb.tmp);
    bb.dq.resize(size_t(n * qd));
    bb.dk.resize(size_t(n * kvd));
    bb.dv.resize(size_t(n * kvd));
    cpu::causal_attention_backward(bb.dq.data(), bb.dk.data(), bb.dv.data(), bb.dout.data(), a.q.data(), a.k.data(),
                                   a.v.data(), a.o.data(), a.lse.data(), batch, seq_len, c.n_heads, c.n_kv_heads,
                                   c.head_dim, 1.0f / std::sqrt(float(c.head_dim)));
    cpu::rope_backward(bb.dq.data(), n, qd, c.n_heads, c.head_dim, c.rope_dim, positions.data(), c.rope_theta,
                       c.rope_neox, c.rope());
    cpu::rope_backward(bb.dk.data(), n, kvd, c.n_kv_heads, c.head_dim, c.rope_dim, positions.data(), c.rope_theta,
                       c.rope_neox, c.rope());
    linear_backward(l, 0, bb.dq.data(), a.h1.data(), a.xa[0], bb.dh.data(), false, bb.tmp);
    linear_backward(l, 1, bb.dk.data(), a.h1.data(), a.xa[1], bb.dh.data(), true, bb.tmp);
    linear_backward(l, 2, bb.dv.data(), a.h1.data(), a.xa[2], bb.dh.data(), true, bb.tmp);
    dx = bb.dx2;
    cpu::rmsnorm_backward(dx.data(), bb.dh.data(), a.x.data(), a.inv1.data(), w.attn_norm.data(), n, d, true);
  }

  Status begin(const Batch& b, const AdapterSet& adapters, AdapterGrads* g, bool use_dropout, uint64_t seed) {
    auto shape = detail::check_call(c, b, adapters, g);
    if (!shape) return shape.error();
    index = std::move(shape->index);
    positions = std::move(shape->positions);
    skip = &b.skip;
    set = &adapters;
    grads = g;
    batch = shape->batch, seq_len = shape->seq_len, n = shape->rows;
    dropout = use_dropout && opt.dropout > 0;
    dropout_seed = seed;
    return ok_status();
  }

  // Runs every layer; returns the last layer's output. Keeps each layer's
  // activations in acts (or only its input in inputs, with checkpointing).
  std::vector<float> forward_layers(const Batch& b, std::vector<LayerActs>& acts,
                                    std::vector<std::vector<float>>& inputs,
                                    const std::function<void(int32_t, const std::vector<float>&)>& after_layer = {}) {
    const int64_t d = c.n_embd;
    const float* embd = model->weights().token_embd.data();
    std::vector<float> x(size_t(n * d));
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(x.data() + i * d, embd + int64_t(b.tokens[size_t(i)]) * d, size_t(d) * sizeof(float));
    acts.assign(opt.checkpoint_layers ? 1 : size_t(c.n_layers), LayerActs{});
    inputs.assign(opt.checkpoint_layers ? size_t(c.n_layers) : 0, {});
    std::vector<float> next;
    for (int32_t l = 0; l < c.n_layers; ++l) {
      LayerActs& a = acts[opt.checkpoint_layers ? 0 : size_t(l)];
      if (opt.checkpoint_layers) inputs[size_t(l)] = x;
      a.x = std::move(x);
      forward_layer(l, a, next);
      x = std::move(next);
      next.clear();
      if (after_layer) after_layer(l, x);
    }
    return x;
  }

  int64_t kept_bytes(const std::vector<LayerActs>& acts, const std::vector<std::vector<float>>& inputs) const {
    int64_t total = 0;
    for (const auto& a : acts) total += a.bytes();
    for (const auto& x : inputs) total += floats_bytes(x);
    return total;
  }

  // The cross-entropy of the final hidden states h (n, d) against the batch's
  // targets, loss_chunk_rows rows of logits at a time; with dh, also
  // grad_scale * d(loss_sum)/dh (rows without a target get 0).
  StepResult cross_entropy(const Batch& b, const std::vector<float>& h, std::vector<float>* dh, float grad_scale,
                           int64_t& chunk_bytes) {
    const int64_t d = c.n_embd, V = c.n_vocab;
    const float* head = model->weights().lm_head();
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < n; ++i)
      if (b.targets[size_t(i)] >= 0) rows.push_back(i);
    if (dh) dh->assign(size_t(n * d), 0.0f);
    const int64_t chunk = std::max<int64_t>(1, opt.loss_chunk_rows);
    std::vector<float> hc(size_t(std::min<int64_t>(chunk, int64_t(rows.size())) * d));
    std::vector<float> z(size_t(std::min<int64_t>(chunk, int64_t(rows.size())) * V)), dhc(hc.size());
    std::vector<double> row_loss(static_cast<size_t>(chunk));
    chunk_bytes = floats_bytes(hc) + floats_bytes(z) + floats_bytes(dhc);
    StepResult r;
    r.tokens = int64_t(rows.size());
    for (size_t begin = 0; begin < rows.size(); begin += size_t(chunk)) {
      const int64_t m = std::min<int64_t>(chunk, int64_t(rows.size() - begin));
      for (int64_t i = 0; i < m; ++i)
        std::memcpy(hc.data() + i * d, h.data() + rows[begin + size_t(i)] * d, size_t(d) * sizeof(float));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m), int(V), int(d), 1.0f, hc.data(), int(d), head,
                  int(d), 0.0f, z.data(), int(V));
#pragma omp parallel for if (m > 1)
      for (int64_t i = 0; i < m; ++i) {
        float* zr = z.data() + i * V;
        const int32_t target = b.targets[size_t(rows[begin + size_t(i)])];
        const float mx = *std::max_element(zr, zr + V);
        double sum = 0.0;
        for (int64_t j = 0; j < V; ++j) sum += std::exp(double(zr[j]) - double(mx));
        const double lse = double(mx) + std::log(sum);
        row_loss[size_t(i)] = lse - double(zr[target]);
        if (!dh) continue;
        for (int64_t j = 0; j < V; ++j) zr[j] = float(std::exp(double(zr[j]) - lse)) * grad_scale;
        zr[target] -= grad_scale;
      }
      for (int64_t i = 0; i < m; ++i) r.loss_sum += row_loss[size_t(i)];
      if (!dh) continue;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(m), int(d), int(V), 1.0f, z.data(), int(V), head,
                  int(d), 0.0f, dhc.data(), int(d));
      for (int64_t i = 0; i < m; ++i)
        std::memcpy(dh->data() + rows[begin + size_t(i)] * d, dhc.data() + i * d, size_t(d) * sizeof(float));
    }
    return r;
  }

  // RMSNorm of x's rows into h, with each row's inverse RMS kept for backward.
  void norm(const std::vector<float>& x, const float* weight, std::vector<float>& h, std::vector<float>& inv) {
    const int64_t d = c.n_embd;
    h.resize(size_t(n * d));
    inv.resize(size_t(n));
    cpu::rmsnorm_inverse(inv.data(), x.data(), n, d, c.rms_eps);
    cpu::rmsnorm(h.data(), x.data(), weight, n, d, c.rms_eps);
  }
  void final_norm(const std::vector<float>& x, std::vector<float>& h, std::vector<float>& inv) {
    norm(x, model->weights().output_norm.data(), h, inv);
  }

  Result<StepResult> run(const Batch& b, const AdapterSet& adapters, AdapterGrads* g, float grad_scale,
                         uint64_t seed) {
    if (auto st = begin(b, adapters, g, g != nullptr, seed); !st) return st.error();
    std::vector<LayerActs> acts;
    std::vector<std::vector<float>> inputs;
    const int32_t last = c.n_layers - 1;
    auto weight = [&](int32_t l) { return opt.exit_weights.empty() ? (l == last ? 1.0f : 0.0f) : opt.exit_weights[size_t(l)]; };
    StepResult r;
    int64_t chunk_bytes = 0;
    // An exit's loss through the final norm and LM head, weighted; its
    // gradient with respect to the layer's output into exit_grads[l].
    std::vector<std::vector<float>> exit_grads(size_t(c.n_layers));
    auto exit_loss = [&](int32_t l, const std::vector<float>& out) {
      const float w = weight(l);
      if (w == 0) return;
      std::vector<float> h, inv, dh;
      final_norm(out, h, inv);
      const StepResult e = cross_entropy(b, h, g ? &dh : nullptr, grad_scale * w, chunk_bytes);
      r.loss_sum += double(w) * e.loss_sum;
      r.tokens = e.tokens;
      if (!opt.exit_weights.empty()) r.exit_loss_sums.push_back(e.loss_sum);
      if (!g) return;
      exit_grads[size_t(l)].resize(size_t(n * c.n_embd));
      cpu::rmsnorm_backward(exit_grads[size_t(l)].data(), dh.data(), out.data(), inv.data(),
                            model->weights().output_norm.data(), n, c.n_embd, false);
    };
    std::vector<float> x = forward_layers(b, acts, inputs, [&](int32_t l, const std::vector<float>& out) {
      if (l < last) exit_loss(l, out);
    });
    exit_loss(last, x);
    int64_t exits = 0;
    for (const auto& e : exit_grads) exits += floats_bytes(e);
    const int64_t kept = kept_bytes(acts, inputs) + 3 * floats_bytes(x) + n * int64_t(sizeof(float)) + exits;
    mem.peak_activation_bytes = std::max(mem.peak_activation_bytes, kept + chunk_bytes);
    if (!g) return r;

    std::vector<float> dx(size_t(n * c.n_embd), 0.0f);
    x = {};
    BackwardBuffers bb;
    std::vector<float> recomputed;
    for (int32_t l = c.n_layers - 1; l >= 0; --l) {
      if (!exit_grads[size_t(l)].empty()) {
        cpu::add_inplace(dx.data(), exit_grads[size_t(l)].data(), n, c.n_embd);
        exit_grads[size_t(l)] = {};
      }
      LayerActs& a = acts[opt.checkpoint_layers ? 0 : size_t(l)];
      if (opt.checkpoint_layers) {
        a.x = inputs[size_t(l)];
        forward_layer(l, a, recomputed);
      }
      backward_layer(l, a, dx, bb);
      mem.peak_activation_bytes =
          std::max(mem.peak_activation_bytes, kept_bytes(acts, inputs) + bb.bytes() + 2 * floats_bytes(dx) + exits);
      if (!opt.checkpoint_layers) a = LayerActs{};  // freed as soon as its backward is done
    }
    return r;
  }
};

LoraGraph::LoraGraph(std::unique_ptr<Impl> impl, std::unique_ptr<detail::DeviceGraph> device)
    : impl_(std::move(impl)), device_(std::move(device)) {}
LoraGraph::~LoraGraph() = default;

Result<std::unique_ptr<LoraGraph>> LoraGraph::create(std::shared_ptr<const Model> model, const GraphOptions& options) {
  if (!model || !model->has_weights()) return Error{"fine-tuning needs a model with weights"};
  if (!(options.dropout >= 0 && options.dropout < 1))
    return Error{fmt::format("fine-tuning: dropout must be in [0, 1), got {}", options.dropout)};
  if (options.loss_chunk_rows <= 0)
    return Error{fmt::format("fine-tuning: loss_chunk_rows must be positive, got {}", options.loss_chunk_rows)};
  if (!options.exit_weights.empty()) {
    if (int64_t(options.exit_weights.size()) != model->config().n_layers)
      return Error{fmt::format("fine-tuning: {} exit weights for {} layers", options.exit_weights.size(),
                               model->config().n_layers)};
    bool any = false;
    for (float w : options.exit_weights) {
      if (!(w >= 0) || !std::isfinite(w))
        return Error{fmt::format("fine-tuning: exit weights must be finite and >= 0, got {}", w)};
      any = any || w > 0;
    }
    if (!any) return Error{"fine-tuning: every exit weight is 0: no loss to train on"};
  }
  auto impl = std::make_unique<Impl>();
  impl->c = model->config();
  impl->opt = options;
  const ModelConfig& c = impl->c;
  if (c.n_heads % c.n_kv_heads != 0) return Error{"fine-tuning: n_heads must be a multiple of n_kv_heads"};
  if (model->projections_released())
    return Error{"fine-tuning: the model's float32 projections were released (a 4-bit base was made from them)"};
  if (options.base.format != WeightFormat::Model) {
    const WeightStorage& s = options.base;
    if (s.block_size < 2 || s.block_size > 4096 || s.block_size % 2 != 0)
      return Error{fmt::format("fine-tuning: the 4-bit block size must be even and in [2, 4096], got {}",
                               s.block_size)};
  }
  if (options.cuda) {  // the device graph holds its own copies of the weights
#ifdef INFERLAB_HAVE_CUDA
    auto device = detail::make_cuda_graph(model, options);
    if (!device) return device.error();
    impl->model = std::move(model);
    return std::unique_ptr<LoraGraph>(new LoraGraph(std::move(impl), std::move(*device)));
#else
    return Error{"fine-tuning: backend \"cuda\" needs a build with the CUDA backend (configure with "
                 "-DINFERLAB_CUDA=ON)"};
#endif
  }
  if (options.base.format != WeightFormat::Model) {
    const WeightStorage& s = options.base;
    const auto format = s.format == WeightFormat::NF4   ? cpu::Quant4Format::NF4
                        : s.format == WeightFormat::FP4 ? cpu::Quant4Format::FP4
                                                        : cpu::Quant4Format::Int4;
    impl->quant.resize(size_t(c.n_layers));
    for (int32_t l = 0; l < c.n_layers; ++l)
      for (int s2 = 0; s2 < kSlots; ++s2) {
        const auto shape = slot_shape(c, s2);
        const int64_t out = shape.first, in = shape.second;
        impl->quant[size_t(l)][size_t(s2)] =
            cpu::quant4_quantize(slot_weight(model->weights().layers[size_t(l)], s2).data(), out, in, format,
                                 s.block_size, s.double_quant);
        impl->mem.base_weight_bytes += impl->quant[size_t(l)][size_t(s2)].bytes();
      }
  } else {
    for (int32_t l = 0; l < c.n_layers; ++l)
      for (int s2 = 0; s2 < kSlots; ++s2) {
        const auto shape = slot_shape(c, s2);
        const int64_t out = shape.first, in = shape.second;
        impl->mem.base_weight_bytes += out * in * int64_t(sizeof(float));
      }
  }
  impl->model = std::move(model);
  return std::unique_ptr<LoraGraph>(new LoraGraph(std::move(impl), nullptr));
}

Result<StepResult> LoraGraph::forward_backward(const Batch& batch, const AdapterSet& adapters, AdapterGrads& grads,
                                               float grad_scale, uint64_t dropout_seed) {
  if (device_) return device_->run(batch, adapters, &grads, grad_scale, dropout_seed);
  return impl_->run(batch, adapters, &grads, grad_scale, dropout_seed);
}

Result<StepResult> LoraGraph::loss(const Batch& batch, const AdapterSet& adapters) {
  if (device_) return device_->run(batch, adapters, nullptr, 0.0f, 0);
  return impl_->run(batch, adapters, nullptr, 0.0f, 0);
}

Result<std::vector<float>> LoraGraph::logits(const Batch& batch, const AdapterSet& adapters) {
  if (device_) return device_->logits(batch, adapters);
  Impl& m = *impl_;
  if (auto st = m.begin(batch, adapters, nullptr, false, 0); !st) return st.error();
  std::vector<LayerActs> acts;
  std::vector<std::vector<float>> inputs;
  std::vector<float> x = m.forward_layers(batch, acts, inputs), h, inv;
  m.final_norm(x, h, inv);
  const int64_t d = m.c.n_embd, V = m.c.n_vocab;
  std::vector<float> z(size_t(m.n * V));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m.n), int(V), int(d), 1.0f, h.data(), int(d),
              m.model->weights().lm_head(), int(d), 0.0f, z.data(), int(V));
  return z;
}

const ModelConfig& LoraGraph::config() const { return impl_->c; }
MemoryStats LoraGraph::memory() const { return device_ ? device_->memory() : impl_->mem; }

}  // namespace inferlab::finetune
