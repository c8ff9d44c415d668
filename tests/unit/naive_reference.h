// A straightforward transformer written from the math, independent of the
// engine's kernels, KV cache and hooks: double precision, no cache. A policy
// lets it apply a method's decisions (which keys a query sees, which layers a
// token runs, which heads and neurons are computed) so engine tests can check
// that the engine carried each hook's decision out exactly.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "inferlab/testing/support.h"
#include "model/model.h"

namespace inferlab::test {

struct NaivePolicy {
  // Query at position t of (layer, head) may read the key at position j <= t.
  std::function<bool(int32_t layer, int32_t head, int64_t t, int64_t j)> key_visible;
  // Token t computes layer l; otherwise the layer is an identity for it.
  std::function<bool(int32_t layer, int64_t t)> runs_layer;
  // For tokens that skip a layer: true = they store no K/V there.
  bool skipped_kv_none = false;
  // RoPE positions (default: the token's own position): query t, and key j as
  // query t sees it (cache-index positions move as tokens are evicted).
  std::function<int64_t(int64_t t)> query_position;
  std::function<int64_t(int64_t t, int64_t j)> key_position;
  std::function<bool(int32_t layer, int32_t head)> head_on;
  std::function<bool(int32_t layer, int32_t neuron)> neuron_on;
  // Called with every softmax probability: query row t of query head `head`
  // gave key position j probability p (attention statistics, key by key).
  std::function<void(int32_t layer, int32_t head, int64_t t, int64_t j, double p)> on_probability;
  // Keys chosen from the reference's own vectors (a selection by key value,
  // as Quest's): query t of (layer, head) with its query `q` (head_dim, after
  // RoPE) and the keys of its kv head at positions 0..t (after RoPE) returns
  // t + 1 flags, true for the keys it reads (besides key_visible).
  std::function<std::vector<bool>(int32_t layer, int32_t head, int64_t t, const std::vector<double>& q,
                                  const std::vector<std::vector<double>>& keys)>
      select_keys;
  // Called once per layer, before its attention, with every token's queries
  // (n, q_dim) and keys (n, kv_dim) after RoPE (patterns estimated from them).
  std::function<void(int32_t layer, const std::vector<std::vector<double>>& q,
                     const std::vector<std::vector<double>>& k)>
      on_queries_keys;
};

// Logits (n_tokens, n_vocab) for a whole prompt at positions 0..n-1.
inline std::vector<double> naive_forward(const Model& model, const std::vector<int32_t>& tokens,
                                         const NaivePolicy& policy = {}) {
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  const int64_t n = int64_t(tokens.size()), d = c.n_embd, hd = c.head_dim;
  auto matvec = [](const WeightVector& m, const std::vector<double>& x, int64_t rows, int64_t cols) {
    std::vector<double> y(size_t(rows), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < cols; ++k) y[size_t(r)] += double(m[size_t(r * cols + k)]) * x[size_t(k)];
    return y;
  };
  auto rmsnorm = [&](const std::vector<double>& x, const WeightVector& g) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / double(x.size()) + double(c.rms_eps));
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * double(g[i]);
    return y;
  };
  auto rope = [&](std::vector<double>& v, int64_t heads, int64_t pos) {
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < c.rope_dim / 2; ++i) {
        const double freq = std::pow(double(c.rope_theta), -2.0 * double(i) / double(c.rope_dim));
        const double a = double(pos) * freq;
        double& x0 = v[size_t(h * hd + 2 * i)];
        double& x1 = v[size_t(h * hd + 2 * i + 1)];
        const double r0 = x0 * std::cos(a) - x1 * std::sin(a), r1 = x0 * std::sin(a) + x1 * std::cos(a);
        x0 = r0;
        x1 = r1;
      }
  };
  auto runs = [&](int32_t l, int64_t t) { return !policy.runs_layer || policy.runs_layer(l, t); };
  std::vector<std::vector<double>> x(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t)
    x[size_t(t)].assign(w.token_embd.begin() + tokens[size_t(t)] * d, w.token_embd.begin() + (tokens[size_t(t)] + 1) * d);
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[size_t(l)];
    const size_t un = static_cast<size_t>(n);
    std::vector<std::vector<double>> q(un), k(un), v(un);
    for (int64_t t = 0; t < n; ++t) {
      auto xn = rmsnorm(x[size_t(t)], lw.attn_norm);
      q[size_t(t)] = matvec(lw.wq, xn, c.q_dim(), d);
      k[size_t(t)] = matvec(lw.wk, xn, c.kv_dim(), d);
      v[size_t(t)] = matvec(lw.wv, xn, c.kv_dim(), d);
      rope(q[size_t(t)], c.n_heads, policy.query_position ? policy.query_position(t) : t);
      if (!policy.key_position) rope(k[size_t(t)], c.n_kv_heads, t);
    }
    if (policy.on_queries_keys) policy.on_queries_keys(l, q, k);
    for (int64_t t = 0; t < n; ++t) {
      if (!runs(l, t)) continue;
      std::vector<double> attn(size_t(c.q_dim()), 0.0);
      for (int64_t h = 0; h < c.n_heads; ++h) {
        if (policy.head_on && !policy.head_on(l, int32_t(h))) continue;
        const int64_t g = h / c.group_size();
        std::vector<bool> chosen;
        if (policy.select_keys) {
          const std::vector<double> qh(q[size_t(t)].begin() + h * hd, q[size_t(t)].begin() + (h + 1) * hd);
          std::vector<std::vector<double>> kg;
          for (int64_t j = 0; j <= t; ++j) kg.emplace_back(k[size_t(j)].begin() + g * hd, k[size_t(j)].begin() + (g + 1) * hd);
          chosen = policy.select_keys(l, int32_t(h), t, qh, kg);
        }
        std::vector<int64_t> keys;
        for (int64_t j = 0; j <= t; ++j) {
          if (policy.skipped_kv_none && !runs(l, j)) continue;
          if (policy.key_visible && !policy.key_visible(l, int32_t(h), t, j)) continue;
          if (!chosen.empty() && !chosen[size_t(j)]) continue;
          keys.push_back(j);
        }
        if (keys.empty()) continue;
        std::vector<double> s;
        for (int64_t j : keys) {
          std::vector<double> kj = k[size_t(j)];
          if (policy.key_position) rope(kj, c.n_kv_heads, policy.key_position(t, j));
          double dot = 0;
          for (int64_t i = 0; i < hd; ++i) dot += q[size_t(t)][size_t(h * hd + i)] * kj[size_t(g * hd + i)];
          s.push_back(dot / std::sqrt(double(hd)));
        }
        const double mx = *std::max_element(s.begin(), s.end());
        double sum = 0;
        for (double& e : s) sum += (e = std::exp(e - mx));
        if (policy.on_probability)
          for (size_t kk = 0; kk < keys.size(); ++kk) policy.on_probability(l, int32_t(h), t, keys[kk], s[kk] / sum);
        for (size_t kk = 0; kk < keys.size(); ++kk)
          for (int64_t i = 0; i < hd; ++i)
            attn[size_t(h * hd + i)] += s[kk] / sum * v[size_t(keys[kk])][size_t(g * hd + i)];
      }
      auto o = matvec(lw.wo, attn, d, c.q_dim());
      for (int64_t i = 0; i < d; ++i) x[size_t(t)][size_t(i)] += o[size_t(i)];
      auto xn = rmsnorm(x[size_t(t)], lw.ffn_norm);
      auto gate = matvec(lw.w_gate, xn, c.n_ff, d);
      auto up = matvec(lw.w_up, xn, c.n_ff, d);
      for (int64_t i = 0; i < c.n_ff; ++i) {
        const bool on = !policy.neuron_on || policy.neuron_on(l, int32_t(i));
        gate[size_t(i)] = on ? gate[size_t(i)] / (1 + std::exp(-gate[size_t(i)])) * up[size_t(i)] : 0.0;
      }
      auto down = matvec(lw.w_down, gate, d, c.n_ff);
      for (int64_t i = 0; i < d; ++i) x[size_t(t)][size_t(i)] += down[size_t(i)];
    }
  }
  const WeightVector& head = w.output.empty() ? w.token_embd : w.output;
  std::vector<double> logits;
  for (int64_t t = 0; t < n; ++t) {
    auto row = matvec(head, rmsnorm(x[size_t(t)], w.output_norm), c.n_vocab, d);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  return logits;
}

}  // namespace inferlab::test
