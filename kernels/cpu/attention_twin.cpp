#include "attention_twin.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "half_convert.h"

namespace inferlab::kernels::cpu {
namespace {

// K and V rows of one kv head's stored tokens, decoded to float:
// k, v (n_stored, head_dim).
struct HeadKv {
  std::vector<float> k, v;
};

float element(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F16: return f16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

HeadKv decode_head(const AttentionCall& call, int32_t g, int32_t n_stored) {
  const KvPages& kv = call.kv;
  const int64_t hd = kv.head_dim;
  HeadKv out{std::vector<float>(size_t(n_stored * hd)), std::vector<float>(size_t(n_stored * hd))};
  for (int32_t t = 0; t < n_stored; ++t) {
    const int32_t page = call.table.pages[int64_t(g) * call.table.stride + t / kv.page_size];
    const void* chunk = kv.chunk_base[page / kv.pages_per_chunk];
    const int64_t k_at = int64_t(page % kv.pages_per_chunk) * kv.page_elems() + int64_t(t % kv.page_size) * hd;
    const int64_t v_at = k_at + int64_t(kv.page_size) * hd;
    for (int64_t d = 0; d < hd; ++d) {
      out.k[size_t(t * hd + d)] = element(chunk, kv.dtype, k_at + d);
      out.v[size_t(t * hd + d)] = element(chunk, kv.dtype, v_at + d);
    }
  }
  return out;
}

// Stored tokens row i of sparse query head h sees: those t <= self inside its
// query block's ranges or among its columns, ascending.
void sparse_row_keys(const AttentionCall& call, int32_t h, int32_t self, std::vector<int32_t>& keys) {
  keys.clear();
  const SparseLayout& sp = call.sparse;
  const SparseHead& head = sp.heads[h];
  const int32_t i = self / head.block_size - head.first_block;
  if (i < 0 || i >= head.n_blocks) return;
  const int32_t b = head.at + i;
  for (int32_t j = sp.range_begin[b]; j < sp.range_end[b]; ++j)
    for (int32_t t = std::max(sp.ranges[2 * j], 0); t < std::min(sp.ranges[2 * j + 1], self + 1); ++t) keys.push_back(t);
  for (int32_t j = sp.column_begin[b]; j < sp.column_end[b]; ++j)
    if (sp.columns[j] <= self) keys.push_back(sp.columns[j]);
  std::sort(keys.begin(), keys.end());
}

// One query row against `n_keys` stored tokens `keys`: out (head_dim) is the
// softmax-weighted sum of their V rows; mass[t] += each key's probability.
void attend_row(const float* q, const HeadKv& kv, const int32_t* keys, size_t n_keys, int64_t hd, float scale,
                float* out, float* mass, std::vector<double>& scores) {
  std::fill(out, out + hd, 0.0f);
  if (n_keys == 0) return;
  scores.resize(n_keys);
  double max_score = -std::numeric_limits<double>::infinity();
  for (size_t j = 0; j < n_keys; ++j) {
    const float* k = &kv.k[size_t(keys[j] * hd)];
    double dot = 0;
    for (int64_t d = 0; d < hd; ++d) dot += double(q[d]) * k[d];
    scores[j] = dot * scale;
    max_score = std::max(max_score, scores[j]);
  }
  double sum = 0;
  for (double& s : scores) sum += (s = std::exp(s - max_score));
  std::vector<double> acc(size_t(hd), 0.0);
  for (size_t j = 0; j < n_keys; ++j) {
    const double p = scores[j] / sum;
    const float* v = &kv.v[size_t(keys[j] * hd)];
    for (int64_t d = 0; d < hd; ++d) acc[size_t(d)] += p * v[d];
    if (mass != nullptr) mass[keys[j]] += float(p);
  }
  for (int64_t d = 0; d < hd; ++d) out[d] = float(acc[size_t(d)]);
}

// All rows of query head h (of kv head g); mass (n_stored) or null.
void attend_head(const AttentionCall& call, int32_t h, const HeadKv& kv, const std::vector<int32_t>& dense_keys,
                 int32_t n_selected, int32_t n_cached, float* mass) {
  const int64_t hd = call.head_dim, row_stride = int64_t(call.n_heads) * hd;
  const bool sparse = call.sparse.sparse(h);
  const int32_t n_stored = n_cached + call.n_rows;
#pragma omp parallel
  {
    std::vector<float> local_mass(mass != nullptr ? size_t(n_stored) : 0, 0.0f);
    std::vector<int32_t> row_keys;
    std::vector<double> scores;
#pragma omp for schedule(dynamic, 16)
    for (int32_t i = 0; i < call.n_rows; ++i) {
      const float* q = call.q + i * row_stride + h * hd;
      float* out = call.out + i * row_stride + h * hd;
      float* row_mass = mass != nullptr ? local_mass.data() : nullptr;
      if (sparse) {
        sparse_row_keys(call, h, n_cached + i, row_keys);
        attend_row(q, kv, row_keys.data(), row_keys.size(), hd, call.scale, out, row_mass, scores);
      } else {
        attend_row(q, kv, dense_keys.data(), size_t(n_selected + i + 1), hd, call.scale, out, row_mass, scores);
      }
    }
    if (mass != nullptr) {
#pragma omp critical
      for (int32_t t = 0; t < n_stored; ++t) mass[t] += local_mass[size_t(t)];
    }
  }
}

}  // namespace

std::vector<int32_t> selected_cached_tokens(const AttentionCall& call, int32_t g, int32_t head_bit) {
  const int32_t n_cached = call.n_cached[g];
  const auto mode = call.select != nullptr ? KeySelect(call.select[g]) : KeySelect::All;
  std::vector<int32_t> tokens;
  if (mode == KeySelect::All) {
    for (int32_t t = 0; t < n_cached; ++t) tokens.push_back(t);
    return tokens;
  }
  const int32_t ps = call.kv.page_size;
  for (int32_t j = call.select_indptr[g]; j < call.select_indptr[g + 1]; ++j) {
    const int32_t x = call.select_index[j];
    if (x < 0) continue;  // outside the cache, like an index past it
    if (head_bit >= 0 && call.select_heads != nullptr && ((call.select_heads[j] >> head_bit) & 1u) == 0) continue;
    if (mode == KeySelect::Tokens) {
      if (x < n_cached) tokens.push_back(x);
    } else {
      for (int32_t t = x * ps; t < std::min(x * ps + ps, n_cached); ++t) tokens.push_back(t);
    }
  }
  return tokens;
}

void attention_twin(const AttentionCall& call) {
  const int64_t hd = call.head_dim;
  const int32_t group = call.group_size();
  for (int32_t g = 0; g < call.n_kv_heads; ++g) {
    const int32_t n_cached = call.n_cached[g], n_stored = n_cached + call.n_rows;
    const HeadKv kv = decode_head(call, g, n_stored);
    float* mass = call.key_mass != nullptr ? call.key_mass + int64_t(g) * call.mass_stride : nullptr;
    for (int32_t h = g * group; h < (g + 1) * group; ++h) {
      if (call.head_active != nullptr && call.head_active[h] == 0) {
        for (int32_t i = 0; i < call.n_rows; ++i) std::fill_n(call.out + (int64_t(i) * call.n_heads + h) * hd, hd, 0.0f);
        continue;
      }
      std::vector<int32_t> keys = selected_cached_tokens(call, g, h - g * group);  // this head's own, with select_heads
      const auto n_selected = int32_t(keys.size());
      for (int32_t i = 0; i < call.n_rows; ++i) keys.push_back(n_cached + i);
      attend_head(call, h, kv, keys, n_selected, n_cached, mass);
    }
  }
}

}  // namespace inferlab::kernels::cpu
