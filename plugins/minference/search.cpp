#include "search.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace inferlab::minference {

namespace {

int64_t scaled(int64_t x, double scale) { return std::max<int64_t>(1, int64_t(std::ceil(double(x) * scale))); }

// Indices of the k largest (ties to the lower index).
std::vector<int64_t> top_k(const std::vector<double>& s, int64_t k) {
  std::vector<int64_t> idx(s.size());
  std::iota(idx.begin(), idx.end(), 0);
  k = std::min<int64_t>(k, int64_t(s.size()));
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int64_t a, int64_t b) { return s[size_t(a)] > s[size_t(b)] || (s[size_t(a)] == s[size_t(b)] && a < b); });
  idx.resize(size_t(k));
  std::sort(idx.begin(), idx.end());
  return idx;
}

}  // namespace

std::vector<Candidate> reference_candidates(double scale, int64_t n_tokens, int32_t block) {
  const int64_t blocks = (n_tokens + block - 1) / block;
  return {{HeadType::StreamLlm, scaled(100, scale), scaled(800, scale)},
          {HeadType::VerticalSlash, scaled(30, scale), scaled(800, scale)},
          {HeadType::VerticalSlash, scaled(100, scale), scaled(750, scale)},
          {HeadType::VerticalSlash, scaled(500, scale), scaled(700, scale)},
          {HeadType::VerticalSlash, scaled(3500, scale), scaled(100, scale)},
          {HeadType::BlockSparse, (blocks + 7) / 8, 0}};
}

std::vector<double> candidate_recall(const float* q, int64_t q_stride, const float* k, int64_t k_stride, int64_t n,
                                     int64_t hd, const std::vector<Candidate>& candidates, const SearchOptions& o) {
  std::vector<double> recall(candidates.size(), 0.0);
  if (n <= 0) return recall;
  const int64_t first = std::min(std::clamp<int64_t>(o.skip_rows, 0, n - 1), std::max<int64_t>(0, n - o.last_q));
  const int64_t rows = n - first;
  // Dense probabilities of rows first .. n - 1, as prefix sums per row
  // (prefix[r][j] = sum of p over keys < j).
  std::vector<float> scores(size_t(rows * n));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(n), int(hd), float(1.0 / std::sqrt(double(hd))),
              q + first * q_stride, int(q_stride), k, int(k_stride), 0.0f, scores.data(), int(n));
  std::vector<double> prefix(size_t(rows * (n + 1)));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = first + r;
    const float* s = &scores[size_t(r * n)];
    const float m = *std::max_element(s, s + t + 1);
    double sum = 0;
    for (int64_t j = 0; j <= t; ++j) sum += std::exp(double(s[j]) - m);
    double* p = &prefix[size_t(r * (n + 1))];
    p[0] = 0;
    for (int64_t j = 0; j < n; ++j) p[j + 1] = p[j] + (j <= t ? std::exp(double(s[j]) - m) / sum : 0.0);
  }
  auto prob = [&](int64_t r, int64_t j) { return prefix[size_t(r * (n + 1) + j + 1)] - prefix[size_t(r * (n + 1) + j)]; };
  auto mass = [&](int64_t r, int64_t lo, int64_t hi) {  // keys [lo, hi) of row r, clipped
    lo = std::max<int64_t>(lo, 0);
    hi = std::min<int64_t>(hi, n);
    return hi > lo ? prefix[size_t(r * (n + 1) + hi)] - prefix[size_t(r * (n + 1) + lo)] : 0.0;
  };
  const int64_t scored_from = std::clamp<int64_t>(o.skip_rows, 0, n - 1), bs = o.block;

  // Vertical and slash scores from the last last_q rows (once for all candidates).
  std::vector<double> vertical(size_t(n), 0.0), slash(size_t(n), 0.0);
  for (int64_t t = std::max<int64_t>(first, n - o.last_q); t < n; ++t)
    for (int64_t j = 0; j <= t; ++j) {
      vertical[size_t(j)] += prob(t - first, j);
      slash[size_t(t - j)] += prob(t - first, j);
    }
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < std::min<int64_t>(o.keep_first_columns, n); ++j) vertical[size_t(j)] = inf;
  for (int64_t d = 0; d < std::min<int64_t>(o.keep_last_diagonals, n); ++d) slash[size_t(d)] = inf;

  // Mean-pooled blocks for block_sparse.
  const int64_t nb = (n + bs - 1) / bs;
  std::vector<double> pq(size_t(nb * hd), 0.0), pk(size_t(nb * hd), 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < hd; ++d) {
      pq[size_t((t / bs) * hd + d)] += q[t * q_stride + d];
      pk[size_t((t / bs) * hd + d)] += k[t * k_stride + d];
    }
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t d = 0; d < hd; ++d) {
      const double c = double(std::min(bs, n - b * bs));
      pq[size_t(b * hd + d)] /= c;
      pk[size_t(b * hd + d)] /= c;
    }

  for (size_t c = 0; c < candidates.size(); ++c) {
    const Candidate& cand = candidates[c];
    double total = 0;
    if (cand.type == HeadType::VerticalSlash) {
      const auto cols = top_k(vertical, cand.a), diags = top_k(slash, cand.b);
      std::vector<std::pair<int64_t, int64_t>> ranges;
      for (int64_t qb = scored_from / bs; qb * bs < n; ++qb) {
        const int64_t q0 = qb * bs, q1 = std::min(q0 + bs, n);
        ranges.clear();
        for (int64_t d : diags)  // block-wide along the diagonal, as the engine's ranges (clipped to the rows later)
          if (q0 + bs - d > 0) ranges.emplace_back(std::max<int64_t>(0, q0 - d), std::min(q0 + bs - d, q1));
        std::sort(ranges.begin(), ranges.end());
        std::vector<std::pair<int64_t, int64_t>> merged;
        for (const auto& r : ranges)
          if (!merged.empty() && r.first <= merged.back().second) merged.back().second = std::max(merged.back().second, r.second);
          else merged.push_back(r);
        for (int64_t t = std::max(q0, scored_from); t < q1; ++t) {
          const int64_t r = t - first;
          for (const auto& [lo, hi] : merged) total += mass(r, lo, std::min(hi, t + 1));
          size_t at = 0;
          for (int64_t col : cols) {
            if (col > t) break;
            while (at < merged.size() && merged[at].second <= col) ++at;
            if (at < merged.size() && merged[at].first <= col) continue;
            total += prob(r, col);
          }
        }
      }
    } else if (cand.type == HeadType::StreamLlm) {
      for (int64_t t = scored_from; t < n; ++t) {
        const int64_t r = t - first, q0 = t / bs * bs, lo = std::max(q0 - cand.b, int64_t(0));
        const int64_t sink_end = std::min(cand.a, t + 1);  // [0, a) and [lo, t], each key once
        total += mass(r, 0, sink_end) + mass(r, std::max(lo, sink_end), t + 1);
      }
    } else {
      std::vector<double> s;
      for (int64_t qb = scored_from / bs; qb < nb; ++qb) {
        s.assign(size_t(qb + 1), 0.0);
        for (int64_t kb = 0; kb <= qb; ++kb)
          for (int64_t d = 0; d < hd; ++d) s[size_t(kb)] += pq[size_t(qb * hd + d)] * pk[size_t(kb * hd + d)];
        const auto chosen = top_k(s, cand.a);
        for (int64_t t = std::max(qb * bs, scored_from); t < std::min(n, qb * bs + bs); ++t)
          for (int64_t kb : chosen) total += mass(t - first, kb * bs, std::min(kb * bs + bs, t + 1));
      }
    }
    recall[c] = total / double(n - scored_from);
  }
  return recall;
}

HeadPattern choose(const std::vector<Candidate>& candidates, const std::vector<double>& recall, bool relabel,
                   double scale) {
  size_t best = 0;
  for (size_t c = 1; c < candidates.size(); ++c)
    if (recall[c] > recall[best]) best = c;
  const Candidate& w = candidates[best];
  HeadPattern p{w.type, w.a, w.b, recall[best]};
  if (relabel && w.type == HeadType::StreamLlm) p.type = HeadType::VerticalSlash;
  if (relabel && w.type == HeadType::BlockSparse) p = {HeadType::VerticalSlash, scaled(1000, scale), scaled(6096, scale), recall[best]};
  return p;
}

}  // namespace inferlab::minference
