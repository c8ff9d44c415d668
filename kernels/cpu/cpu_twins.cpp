#include "cpu/cpu_twins.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/half_convert.h"

namespace inferlab::kernels::cpu {

namespace {

float load(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F16: return f16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

void store(void* base, DType dtype, int64_t i, float x) {
  switch (dtype) {
    case DType::F16: static_cast<uint16_t*>(base)[i] = float_to_f16(x); break;
    case DType::BF16: static_cast<uint16_t*>(base)[i] = float_to_bf16(x); break;
    default: static_cast<float*>(base)[i] = x; break;
  }
}

// Start of the K row of (page, slot), as bytes; the V row is page_size rows
// further. Rows are elements or bit-plane records (KvPages::row_bytes).
char* key_row(const KvPages& kv, int32_t page, int32_t slot) {
  return static_cast<char*>(kv.chunk_base[page / kv.pages_per_chunk]) +
         (int64_t(page % kv.pages_per_chunk) * 2 * kv.page_size + slot) * kv.row_bytes();
}

char* value_row(const KvPages& kv, int32_t page, int32_t slot) {
  return key_row(kv, page, slot) + int64_t(kv.page_size) * kv.row_bytes();
}

}  // namespace

void convert_from_float(const float* x, int64_t n, void* out, DType dtype) {
  for (int64_t i = 0; i < n; ++i) store(out, dtype, i, x[i]);
}

void convert_to_float(const void* x, DType dtype, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = load(x, dtype, i);
}

void embedding_lookup(const void* table, DType dtype, int64_t n_embd, const int32_t* ids, int64_t n, float* out) {
  const int64_t row_bytes = n_embd * dtype_bytes(dtype);
  for (int64_t r = 0; r < n; ++r)
    convert_to_float(static_cast<const char*>(table) + ids[r] * row_bytes, dtype, n_embd, out + r * n_embd);
}

void head_output_norms(const float* attn, int32_t n_rows, int32_t n_heads, int32_t head_dim, float* norms,
                       float* l1) {
  for (int32_t h = 0; h < n_heads; ++h) {
    double total = 0.0, total_l1 = 0.0;
    for (int32_t r = 0; r < n_rows; ++r) {
      const float* head = attn + (int64_t(r) * n_heads + h) * head_dim;
      double sum_sq = 0.0, sum_abs = 0.0;
      for (int32_t d = 0; d < head_dim; ++d) {
        sum_sq += double(head[d]) * head[d];
        sum_abs += std::fabs(double(head[d]));
      }
      total += std::sqrt(sum_sq);
      total_l1 += sum_abs;
    }
    norms[h] = float(total);
    if (l1 != nullptr) l1[h] = float(total_l1);
  }
}

void gather_rows(const void* w, DType dtype, int64_t row_len, const int32_t* rows, int64_t n_rows, void* out) {
  const int64_t row_bytes = row_len * dtype_bytes(dtype);
  for (int64_t i = 0; i < n_rows; ++i)
    std::memcpy(static_cast<char*>(out) + i * row_bytes, static_cast<const char*>(w) + rows[i] * row_bytes,
                size_t(row_bytes));
}

void kv_append(const KvPages& kv, LayerPageTable table, const int32_t* first_token, const float* k, const float* v,
               int32_t n_rows, int32_t n_kv_heads) {
  for (int32_t g = 0; g < n_kv_heads; ++g) {
    for (int32_t i = 0; i < n_rows; ++i) {
      const int32_t t = first_token[g] + i;
      const int32_t page = table.pages[int64_t(g) * table.stride + t / kv.page_size], slot = t % kv.page_size;
      const int64_t src = (int64_t(i) * n_kv_heads + g) * kv.head_dim;
      if (kv.planes.active()) {
        bit_plane_encode(k + src, kv.head_dim, kv.planes, key_row(kv, page, slot));
        bit_plane_encode(v + src, kv.head_dim, kv.planes, value_row(kv, page, slot));
        continue;
      }
      convert_from_float(k + src, kv.head_dim, key_row(kv, page, slot), kv.dtype);
      convert_from_float(v + src, kv.head_dim, value_row(kv, page, slot), kv.dtype);
    }
  }
}

void kv_move_rows(const KvPages& kv, const int32_t* src_page, const int32_t* src_slot, const int32_t* dst_page,
                  const int32_t* dst_slot, int32_t n_moves) {
  // Gather every source first (moves may chain), then scatter: scratch (n_moves, 2, row_bytes).
  const size_t row_bytes = size_t(kv.row_bytes());
  std::vector<char> scratch(size_t(n_moves) * 2 * row_bytes);
  for (int32_t j = 0; j < n_moves; ++j) {
    std::memcpy(&scratch[2 * j * row_bytes], key_row(kv, src_page[j], src_slot[j]), row_bytes);
    std::memcpy(&scratch[(2 * j + 1) * row_bytes], value_row(kv, src_page[j], src_slot[j]), row_bytes);
  }
  for (int32_t j = 0; j < n_moves; ++j) {
    std::memcpy(key_row(kv, dst_page[j], dst_slot[j]), &scratch[2 * j * row_bytes], row_bytes);
    std::memcpy(value_row(kv, dst_page[j], dst_slot[j]), &scratch[(2 * j + 1) * row_bytes], row_bytes);
  }
}

void kv_rope_shift(const KvPages& kv, const int32_t* page, const int32_t* slot, const int32_t* delta, int32_t n,
                   int32_t rope_dim, float theta, bool neox, const RopeScaling& scaling) {
  std::vector<float> row(size_t(kv.head_dim));
  for (int32_t j = 0; j < n; ++j) {
    char* stored = key_row(kv, page[j], slot[j]);
    convert_to_float(stored, kv.dtype, kv.head_dim, row.data());
    rope_shift(row.data(), 1, kv.head_dim, kv.head_dim, rope_dim, delta[j], theta, neox, scaling);
    convert_from_float(row.data(), kv.head_dim, stored, kv.dtype);
  }
}

void kv_rope_from_originals(const KvPages& kv, const int32_t* page, const int32_t* slot, const int32_t* origin_page,
                            const int32_t* delta, const int32_t* save, int32_t n, int32_t rope_dim, float theta,
                            bool neox, const RopeScaling& scaling) {
  std::vector<float> row(size_t(kv.head_dim));
  const size_t rotary_bytes = size_t(rope_dim) * size_t(dtype_bytes(kv.dtype));
  for (int32_t j = 0; j < n; ++j) {
    char* stored = key_row(kv, page[j], slot[j]);
    char* original = key_row(kv, origin_page[j], slot[j]);
    if (save[j] != 0) std::memcpy(original, stored, rotary_bytes);
    convert_to_float(original, kv.dtype, rope_dim, row.data());
    rope_shift(row.data(), 1, rope_dim, rope_dim, rope_dim, delta[j], theta, neox, scaling);
    convert_from_float(row.data(), rope_dim, stored, kv.dtype);
  }
}

void kv_copy_pages(const KvPages& kv, const int32_t* src, const int32_t* dst, int32_t n) {
  const size_t page_bytes = size_t(kv.page_bytes());
  for (int32_t j = 0; j < n; ++j) std::memcpy(key_row(kv, dst[j], 0), key_row(kv, src[j], 0), page_bytes);
}

void page_bounds_update(const KvPages& kv, void* bounds, const int32_t* pages, const int32_t* counts, int32_t n) {
  const int32_t hd = kv.head_dim;
  std::vector<float> lo(static_cast<size_t>(hd)), hi(static_cast<size_t>(hd)), key(static_cast<size_t>(hd));
  for (int32_t j = 0; j < n; ++j) {
    std::fill(lo.begin(), lo.end(), std::numeric_limits<float>::infinity());
    std::fill(hi.begin(), hi.end(), -std::numeric_limits<float>::infinity());
    for (int32_t slot = 0; slot < counts[j]; ++slot) {
      convert_to_float(key_row(kv, pages[j], slot), kv.dtype, hd, key.data());
      for (int32_t i = 0; i < hd; ++i) {
        lo[size_t(i)] = std::min(lo[size_t(i)], key[size_t(i)]);
        hi[size_t(i)] = std::max(hi[size_t(i)], key[size_t(i)]);
      }
    }
    const int64_t base = int64_t(pages[j]) * 2 * hd;
    for (int32_t i = 0; i < hd; ++i) {
      store(bounds, kv.dtype, base + i, lo[size_t(i)]);
      store(bounds, kv.dtype, base + hd + i, hi[size_t(i)]);
    }
  }
}

void page_select(const PageSelectCall& call) {
  const int32_t hd = call.head_dim, gs = call.group_size;
  const int32_t selections = call.per_head != 0 ? gs : 1;  // per kv head
  std::vector<float> lo(static_cast<size_t>(hd)), hi(static_cast<size_t>(hd));
  std::vector<int32_t> order;
  std::vector<uint32_t> marks;
  for (int32_t g = 0; g < call.n_kv_heads; ++g) {
    const int32_t keep = call.keep[g];
    if (keep <= 0) continue;
    const int32_t n_pages = (call.n_cached[g] + call.page_size - 1) / call.page_size;
    const float* q = call.q + int64_t(g) * gs * hd;
    if (call.per_head != 0) marks.assign(size_t(n_pages), 0u);
    for (int32_t sel = 0; sel < selections; ++sel) {
      // The query heads this selection scores with: the group, or head `sel` alone.
      const int32_t h_begin = call.per_head != 0 ? sel : 0, h_end = call.per_head != 0 ? sel + 1 : gs;
      float* score = call.scores + (int64_t(g) * selections + sel) * call.score_stride;
      // Pages in parallel (f32 bounds, read in place; other types convert into
      // the shared lo/hi, so one thread), each sum in 16 lanes so it vectorizes.
      const bool in_place = call.dtype == DType::F32;
      const int32_t wide = hd - hd % 16;
#pragma omp parallel for schedule(static) if (in_place && n_pages > 64)
      for (int32_t p = 0; p < n_pages - 1; ++p) {
        const int64_t base = int64_t(call.table.pages[int64_t(g) * call.table.stride + p]) * 2 * hd;
        const float *page_lo = lo.data(), *page_hi = hi.data();
        if (in_place) {  // the CPU engine's bounds
          page_lo = static_cast<const float*>(call.bounds) + base;
          page_hi = page_lo + hd;
        } else {
          const char* bytes = static_cast<const char*>(call.bounds) + base * dtype_bytes(call.dtype);
          convert_to_float(bytes, call.dtype, hd, lo.data());
          convert_to_float(bytes + int64_t(hd) * dtype_bytes(call.dtype), call.dtype, hd, hi.data());
        }
        // max(q*lo, q*hi) per dimension, a NaN product (0 * an infinite bound) giving way.
        const auto pick = [](float a, float b) { return a < b || a != a ? b : a; };
        float lanes[16] = {};
        for (int32_t h = h_begin; h < h_end; ++h) {
          const float* qh = q + int64_t(h) * hd;
          for (int32_t i = 0; i < wide; i += 16)
            for (int32_t j = 0; j < 16; ++j)
              lanes[j] += pick(qh[i + j] * page_lo[i + j], qh[i + j] * page_hi[i + j]);
          for (int32_t i = wide; i < hd; ++i) lanes[i - wide] += pick(qh[i] * page_lo[i], qh[i] * page_hi[i]);
        }
        float s = 0;
        for (const float v : lanes) s += v;
        score[p] = std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;  // both products NaN: ranks last
      }
      order.resize(size_t(n_pages - 1));
      std::iota(order.begin(), order.end(), 0);
      const int32_t others = std::min(keep - 1, n_pages - 1);
      std::partial_sort(order.begin(), order.begin() + others, order.end(), [&](int32_t a, int32_t b) {
        return score[a] > score[b] || (score[a] == score[b] && a < b);
      });
      order.resize(size_t(others));
      std::sort(order.begin(), order.end());
      order.push_back(n_pages - 1);
      if (call.per_head == 0) {
        std::copy(order.begin(), order.end(), call.out + call.out_offset[g]);
        continue;
      }
      for (int32_t p : order) marks[size_t(p)] |= 1u << sel;
    }
    if (call.per_head == 0) continue;
    // The union, ascending, at the end of the kv head's slots; unused slots first.
    const int32_t slots = gs * (keep - 1) + 1;
    int32_t at = call.out_offset[g] + slots;
    for (int32_t p = n_pages - 1; p >= 0; --p)
      if (marks[size_t(p)] != 0) {
        --at;
        call.out[at] = p;
        call.out_heads[at] = marks[size_t(p)];
      }
    for (int32_t j = call.out_offset[g]; j < at; ++j) {
      call.out[j] = -1;
      call.out_heads[j] = 0;
    }
  }
}

float kv_load(const KvPages& kv, int32_t page, int32_t slot, bool value, int32_t index) {
  const char* row = value ? value_row(kv, page, slot) : key_row(kv, page, slot);
  if (kv.planes.active())
    return bit_plane_value(reinterpret_cast<const uint8_t*>(row), kv.head_dim, kv.planes, index, true);
  return load(row, kv.dtype, index);
}

bool attention_row_progressive(const float* q, const KvPageRef* pages, int64_t n_pages, int64_t n_visible,
                               int64_t head_dim, float scale, double keep, bool renormalize, float threshold,
                               float* out, float* probs, uint8_t* kept) {
  std::vector<KvPageRef> planes(pages, pages + n_pages);
  for (KvPageRef& p : planes) p.lsb = false;
  attention_row_value_topk(q, planes.data(), n_pages, n_visible, head_dim, scale, keep, renormalize, out, probs, kept);
  // The largest probability is 1 / sum in the max-relative sum.
  if (n_visible <= 0 || !(*std::max_element(probs, probs + n_visible) < threshold)) return false;
  for (KvPageRef& p : planes) p.lsb = true;
  attention_row_value_topk(q, planes.data(), n_pages, n_visible, head_dim, scale, keep, renormalize, out, probs, kept);
  return true;
}

int32_t sample_top_p(const float* raw, int64_t n, float temperature, float top_p, float uniform) {
  // Descending logits, lower id first on ties (stable sort of ascending ids); a NaN counts as -infinity.
  std::vector<float> logits(raw, raw + n);
  for (float& x : logits)
    if (std::isnan(x)) x = -std::numeric_limits<float>::infinity();
  std::vector<int32_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[size_t(a)] > logits[size_t(b)]; });
  if (!(temperature > 0.0f)) return order[0];
  std::vector<double> cumulative(static_cast<size_t>(n));
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    sum += std::exp((double(logits[size_t(order[size_t(i)])]) - double(logits[size_t(order[0])])) / double(temperature));
    cumulative[size_t(i)] = sum;
  }
  // Kept: tokens 0..last, the first prefix whose mass reaches top_p.
  const auto first_reaching = [&](int64_t end, auto pred) {
    return std::min<int64_t>(std::find_if(cumulative.begin(), cumulative.begin() + end + 1, pred) - cumulative.begin(),
                             end);
  };
  const double need = double(top_p) * sum;
  const int64_t last = first_reaching(n - 1, [&](double c) { return c >= need; });
  const double target = double(uniform) * cumulative[size_t(last)];
  return order[size_t(first_reaching(last, [&](double c) { return c > target; }))];
}

void fill_random_normal(void* out, DType dtype, int64_t n, uint64_t seed, float stddev) {
  for (int64_t i = 0; i < n; ++i) store(out, dtype, i, stddev * random_normal_value(seed, i));
}

void slot_plane_fill(LayerPageTable table, const int32_t* first_token, int32_t n_rows, int32_t n_kv_heads,
                     int32_t page_size, uint32_t* plane, uint32_t value) {
  for (int32_t g = 0; g < n_kv_heads; ++g)
    for (int32_t i = 0; i < n_rows; ++i) {
      const int32_t t = first_token[g] + i;
      plane[int64_t(table.pages[int64_t(g) * table.stride + t / page_size]) * page_size + t % page_size] = value;
    }
}

void slot_plane_move(uint32_t* plane, int32_t page_size, const int32_t* src_page, const int32_t* src_slot,
                     const int32_t* dst_page, const int32_t* dst_slot, int32_t n) {
  std::vector<uint32_t> saved(static_cast<size_t>(std::max(n, 0)));
  for (int32_t j = 0; j < n; ++j) saved[size_t(j)] = plane[int64_t(src_page[j]) * page_size + src_slot[j]];
  for (int32_t j = 0; j < n; ++j) plane[int64_t(dst_page[j]) * page_size + dst_slot[j]] = saved[size_t(j)];
}

void slot_plane_copy_pages(const uint32_t* from, uint32_t* to, int32_t page_size, const int32_t* src,
                           const int32_t* dst, int32_t n) {
  for (int32_t j = 0; j < n; ++j)
    std::memcpy(to + int64_t(dst[j]) * page_size, from + int64_t(src[j]) * page_size, size_t(page_size) * 4);
}

void retention_drops(const float* score, int32_t n, int32_t sink, int32_t recent, int32_t heavy,
                     std::vector<int32_t>& drop) {
  drop.clear();
  if (heavy < 0 || int64_t(n) <= int64_t(sink) + recent + heavy) return;
  auto key = [&](int32_t i) { return std::isnan(score[i]) ? -std::numeric_limits<float>::infinity() : score[i]; };
  std::vector<int32_t> order(static_cast<size_t>(n - recent - sink));  // candidates sink .. n - recent - 1
  std::iota(order.begin(), order.end(), sink);
  std::nth_element(order.begin(), order.begin() + heavy, order.end(),
                   [&](int32_t a, int32_t c) { return key(a) > key(c) || (key(a) == key(c) && a < c); });
  drop.assign(order.begin() + heavy, order.end());
  std::sort(drop.begin(), drop.end());
}

void retention_update(const RetentionCall& c) {
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    const int32_t cached = c.n_cached[g];
    for (int32_t t = 0; t < cached + c.n_rows; ++t) {
      float& s = c.plane[int64_t(c.table.pages[int64_t(g) * c.table.stride + t / c.page_size]) * c.page_size +
                         t % c.page_size];
      const float mass = c.mass[int64_t(g) * c.mass_stride + t];
      const float old = t >= cached ? 0.0f : s;
      s = c.rule == 1 ? mass : old + mass;
      c.scores[int64_t(g) * c.stride + t] = std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
    }
  }
}

void retention_select(const RetentionCall& c) {
  std::vector<int32_t> drop;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    retention_drops(c.scores + int64_t(g) * c.stride, c.n_cached[g] + c.n_rows, c.budget[3 * g], c.budget[3 * g + 1],
                    c.budget[3 * g + 2], drop);
    c.n_drops[g] = int32_t(drop.size());
    std::copy(drop.begin(), drop.end(), c.drops + int64_t(g) * c.stride);
  }
}

void sequence_retention_update(const SequenceRetentionCall& c) {
  for (int32_t t = 0; t < c.n_tokens; ++t) {
    float sum = c.score[c.positions[t]];
    for (int32_t g = 0; g < c.n_kv_heads; ++g) sum += c.mass[int64_t(g) * c.mass_stride + t];
    c.score[c.positions[t]] = sum;
  }
}

void sequence_retention_select(const SequenceRetentionCall& c) {
  std::vector<int32_t> candidates;  // stored indices
  std::vector<float> score;
  for (int32_t t = 0; t < c.n_tokens; ++t) {
    const int32_t mark = c.dropped_at[c.positions[t]];
    if (mark > 0 && mark <= c.layer) continue;  // dropped by a shallower layer
    candidates.push_back(t);
    score.push_back(c.score[c.positions[t]]);
  }
  std::vector<int32_t> leave;  // candidate indices
  retention_drops(score.data(), int32_t(score.size()), c.sink, c.recent, c.heavy, leave);
  std::vector<uint8_t> gone(size_t(c.n_tokens), 1);
  for (int32_t t : candidates) gone[size_t(t)] = 0;
  for (int32_t i : leave) {
    const int32_t t = candidates[size_t(i)];
    gone[size_t(t)] = 1;
    c.dropped_at[c.positions[t]] = c.layer + 1;
  }
  int32_t n = 0;
  for (int32_t t = 0; t < c.n_tokens; ++t)
    if (gone[size_t(t)] != 0) c.drops[n++] = t;
  c.n_drops[0] = n;
}

}  // namespace inferlab::kernels::cpu
