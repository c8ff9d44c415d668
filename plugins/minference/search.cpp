#include "search.h"


#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>

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

using Range = std::pair<int64_t, int64_t>;  // keys [first, second)

// Sorted, overlapping and touching ranges joined.
void merge(std::vector<Range>& ranges) {
  std::sort(ranges.begin(), ranges.end());
  size_t out = 0;
  for (const Range& r : ranges)
    if (out > 0 && r.first <= ranges[out - 1].second) ranges[out - 1].second = std::max(ranges[out - 1].second, r.second);
    else ranges[out++] = r;
  ranges.resize(out);
}

// One head's dense attention probabilities on the rows a search scores, and
// what the candidates' key sets are estimated from; both searches read the
// candidates' keys from here.
class HeadEstimate {
 public:
  // `scored`: ascending rows; the last last_q rows get probabilities as well
  // (they estimate the vertical-slash indices).
  HeadEstimate(const float* q, int64_t q_stride, const float* k, int64_t k_stride, int64_t n, int64_t hd,
               const SearchOptions& o, std::vector<int64_t> scored)
      : n_(n), bs_(o.block), hd_(hd), scored_(std::move(scored)), slot_(size_t(n), -1) {
    // Rows with probabilities, as prefix sums per row (prefix[j] = sum of p
    // over keys < j).
    std::vector<char> wanted(size_t(n), 0);
    for (int64_t t : scored_) wanted[size_t(t)] = 1;
    for (int64_t t = std::max<int64_t>(0, n - o.last_q); t < n; ++t) wanted[size_t(t)] = 1;
    std::vector<int64_t> rows;
    for (int64_t t = 0; t < n; ++t)
      if (wanted[size_t(t)]) slot_[size_t(t)] = int64_t(rows.size()), rows.push_back(t);
    const int64_t r_count = int64_t(rows.size());
    std::vector<float> qr(size_t(r_count * hd)), scores(size_t(r_count * n));
    for (int64_t r = 0; r < r_count; ++r) std::copy_n(q + rows[size_t(r)] * q_stride, hd, &qr[size_t(r * hd)]);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(r_count), int(n), int(hd),
                float(1.0 / std::sqrt(double(hd))), qr.data(), int(hd), k, int(k_stride), 0.0f, scores.data(), int(n));
    prefix_.resize(size_t(r_count * (n + 1)));
    for (int64_t r = 0; r < r_count; ++r) {
      const int64_t t = rows[size_t(r)];
      const float* s = &scores[size_t(r * n)];
      const float m = *std::max_element(s, s + t + 1);
      double* p = &prefix_[size_t(r * (n + 1))];
      double sum = 0;
      for (int64_t j = 0; j <= t; ++j) sum += (p[j + 1] = std::exp(double(s[j]) - m));  // each exp once
      p[0] = 0;
      for (int64_t j = 0; j < n; ++j) p[j + 1] = p[j] + (j <= t ? p[j + 1] / sum : 0.0);
    }

    // Vertical and slash scores from the last last_q rows (once for all candidates).
    vertical_.assign(size_t(n), 0.0);
    slash_.assign(size_t(n), 0.0);
    for (int64_t t = std::max<int64_t>(0, n - o.last_q); t < n; ++t)
      for (int64_t j = 0; j <= t; ++j) {
        vertical_[size_t(j)] += prob(t, j);
        slash_[size_t(t - j)] += prob(t, j);
      }
    const double inf = std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < std::min<int64_t>(o.keep_first_columns, n); ++j) vertical_[size_t(j)] = inf;
    for (int64_t d = 0; d < std::min<int64_t>(o.keep_last_diagonals, n); ++d) slash_[size_t(d)] = inf;

    // Mean-pooled blocks for block_sparse.
    const int64_t nb = (n + bs_ - 1) / bs_;
    pq_.assign(size_t(nb * hd), 0.0);
    pk_.assign(size_t(nb * hd), 0.0);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t d = 0; d < hd; ++d) {
        pq_[size_t((t / bs_) * hd + d)] += q[t * q_stride + d];
        pk_[size_t((t / bs_) * hd + d)] += k[t * k_stride + d];
      }
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t d = 0; d < hd; ++d) {
        const double c = double(std::min(bs_, n - b * bs_));
        pq_[size_t(b * hd + d)] /= c;
        pk_[size_t(b * hd + d)] /= c;
      }
  }

  const std::vector<int64_t>& scored() const { return scored_; }

  // Row t's (a row with probabilities) prefix sums: [j] = the probability of keys < j.
  const double* prefix(int64_t t) const { return &prefix_[size_t(slot_[size_t(t)] * (n_ + 1))]; }
  // Probability of key j, and mass of keys [lo, hi) (clipped), in row t.
  double prob(int64_t t, int64_t j) const { return mass(t, j, j + 1); }
  double mass(int64_t t, int64_t lo, int64_t hi) const {
    lo = std::max<int64_t>(lo, 0);
    hi = std::min(hi, n_);
    return hi > lo ? prefix(t)[hi] - prefix(t)[lo] : 0.0;
  }

  // Calls visit(t, ranges) for each scored row t with the keys candidate `c`
  // keeps in it: disjoint, non-empty ranges of keys <= t (ranges first, then
  // the vertical-slash columns no range holds, one key each).
  template <class Visit>
  void key_sets(const Candidate& c, Visit&& visit) const {
    std::vector<int64_t> cols, diags;
    if (c.type == HeadType::VerticalSlash) cols = top_k(vertical_, c.a), diags = top_k(slash_, c.b);
    std::vector<Range> block, row;  // the query block's ranges (unclipped), the row's keys
    std::vector<double> s;
    int64_t current = -1;
    for (int64_t t : scored_) {
      const int64_t qb = t / bs_, q0 = qb * bs_, q1 = std::min(q0 + bs_, n_);
      if (qb != current) {
        current = qb;
        block.clear();
        switch (c.type) {
          case HeadType::VerticalSlash:
            for (int64_t d : diags)  // block-wide along the diagonal, as the engine's ranges
              if (q0 + bs_ - d > 0) block.emplace_back(std::max<int64_t>(0, q0 - d), std::min(q0 + bs_ - d, q1));
            break;
          case HeadType::StreamLlm: block = {{0, c.a}, {std::max<int64_t>(q0 - c.b, 0), q1}}; break;
          case HeadType::BlockSparse:
            s.assign(size_t(qb + 1), 0.0);
            for (int64_t kb = 0; kb <= qb; ++kb)
              for (int64_t d = 0; d < hd_; ++d) s[size_t(kb)] += pq_[size_t(qb * hd_ + d)] * pk_[size_t(kb * hd_ + d)];
            for (int64_t kb : top_k(s, c.a)) block.emplace_back(kb * bs_, kb * bs_ + bs_);
            break;
        }
        merge(block);
      }
      row.clear();
      for (const auto& [lo, hi] : block)
        if (lo < std::min(hi, t + 1)) row.emplace_back(lo, std::min(hi, t + 1));
      size_t at = 0;
      for (int64_t col : cols) {
        if (col > t) break;
        while (at < block.size() && block[at].second <= col) ++at;
        if (at < block.size() && block[at].first <= col) continue;
        row.emplace_back(col, col + 1);
      }
      visit(t, row);
    }
  }

 private:
  int64_t n_, bs_, hd_;
  std::vector<int64_t> scored_;
  std::vector<int64_t> slot_;   // row -> its probabilities in prefix_ (-1: none)
  std::vector<double> prefix_;  // per row with probabilities: n + 1 prefix sums
  std::vector<double> vertical_, slash_, pq_, pk_;
};

// Rows skip_rows .. n - 1 (skip_rows clamped into the prompt), every `stride`-th.
std::vector<int64_t> scored_rows(int64_t n, int64_t skip_rows, int64_t stride) {
  std::vector<int64_t> rows;
  for (int64_t t = std::clamp<int64_t>(skip_rows, 0, n - 1); t < n; t += stride) rows.push_back(t);
  return rows;
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

std::vector<Candidate> run_candidates(double scale, int64_t n_tokens, int32_t block) {
  auto candidates = reference_candidates(scale, n_tokens, block);
  for (auto& c : candidates)
    if (c.type == HeadType::VerticalSlash) std::tie(c.a, c.b) = vertical_slash_run_counts(c.a, c.b, n_tokens);
  return candidates;
}

std::vector<double> candidate_recall(const float* q, int64_t q_stride, const float* k, int64_t k_stride, int64_t n,
                                     int64_t hd, const std::vector<Candidate>& candidates, const SearchOptions& o) {
  std::vector<double> recall(candidates.size(), 0.0);
  if (n <= 0) return recall;
  const HeadEstimate head(q, q_stride, k, k_stride, n, hd, o, scored_rows(n, o.skip_rows, 1));
  for (size_t c = 0; c < candidates.size(); ++c) {
    double total = 0;
    head.key_sets(candidates[c], [&](int64_t t, const std::vector<Range>& keys) {
      for (const auto& [lo, hi] : keys) total += head.mass(t, lo, hi);
    });
    recall[c] = total / double(head.scored().size());
  }
  return recall;
}

std::vector<OutputDeviation> candidate_output_deviation(const float* q, int64_t q_stride, const float* k,
                                                        int64_t k_stride, const float* v, int64_t v_stride, int64_t n,
                                                        int64_t hd, const std::vector<Candidate>& candidates,
                                                        const SearchOptions& o) {
  std::vector<OutputDeviation> out(candidates.size());
  if (n <= 0) return out;
  const HeadEstimate head(q, q_stride, k, k_stride, n, hd, o,
                          scored_rows(n, o.skip_rows, std::max<int64_t>(1, o.row_stride)));
  // Row t's output over `keys`, from its dense probabilities (no softmax per candidate).
  std::vector<double> acc(size_t(hd), 0.0);
  auto restricted = [&](int64_t t, const std::vector<Range>& keys, double* o_row) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const double* prefix = head.prefix(t);  // the ranges are within the row's keys
    double mass = 0;
    for (const auto& [lo, hi] : keys) {
      mass += prefix[hi] - prefix[lo];
      for (int64_t j = lo; j < hi; ++j) {
        const double p = prefix[j + 1] - prefix[j];
        const float* vj = v + j * v_stride;
        for (int64_t d = 0; d < hd; ++d) acc[size_t(d)] += p * double(vj[d]);
      }
    }
    for (int64_t d = 0; d < hd; ++d) o_row[d] = mass > 0 ? acc[size_t(d)] / mass : 0.0;
  };
  const auto& rows = head.scored();
  std::vector<double> dense(rows.size() * size_t(hd)), sparse(size_t(hd), 0.0);
  for (size_t r = 0; r < rows.size(); ++r) restricted(rows[r], {{0, rows[r] + 1}}, &dense[r * size_t(hd)]);
  for (size_t c = 0; c < candidates.size(); ++c) {
    size_t r = 0;
    head.key_sets(candidates[c], [&](int64_t t, const std::vector<Range>& keys) {
      restricted(t, keys, sparse.data());
      const double* d_row = &dense[r++ * size_t(hd)];
      for (int64_t d = 0; d < hd; ++d)
        if (std::abs(sparse[size_t(d)] - d_row[d]) > o.threshold) ++out[c].deviating;
    });
    out[c].elements = int64_t(rows.size()) * hd;
  }
  return out;
}

HeadPattern choose(const std::vector<Candidate>& candidates, const std::vector<double>& score, bool relabel,
                   double scale) {
  size_t best = 0;
  for (size_t c = 1; c < candidates.size(); ++c)
    if (score[c] > score[best]) best = c;
  const Candidate& w = candidates[best];
  HeadPattern p{w.type, w.a, w.b, score[best]};
  if (relabel && w.type == HeadType::StreamLlm) p.type = HeadType::VerticalSlash;
  if (relabel && w.type == HeadType::BlockSparse) p = {HeadType::VerticalSlash, scaled(1000, scale), scaled(6096, scale), score[best]};
  return p;
}

}  // namespace inferlab::minference
