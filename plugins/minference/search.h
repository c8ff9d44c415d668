// MInference's offline pattern search, per query head, on the queries and keys
// (after RoPE) of a calibration prompt. Two measures, each the reference's:
//   recall  (search_pattern) the dense attention probabilities of the head,
//           then for each candidate pattern the share of that probability
//           mass the pattern keeps, averaged over the rows from `skip_rows`
//           on; the candidate with the highest recall wins.
//   output  (search_pattern_v2) the head's attention output restricted to
//           each candidate's keys against the dense output, on the values as
//           well: the candidate with the fewest output elements off by more
//           than `threshold` wins.
// Each candidate keeps the keys the engine's sparse kernel would compute for it
// (PrefillPattern): vertical-slash diagonals as block-wide ranges along the
// diagonal, A-shape windows per query block, top-k blocks by mean-pooled
// scores. (The reference scores single diagonals and 32-token blocks, what its
// search script builds, not what its kernels compute.)
#pragma once

#include <algorithm>
#include <utility>

#include <cstdint>
#include <string>
#include <vector>

#include "pattern_file.h"

namespace inferlab::minference {

struct Candidate {
  HeadType type = HeadType::VerticalSlash;
  int64_t a = 0, b = 0;  // vertical/slash counts, sink/local, or (block_sparse) a = top-k blocks
};

struct SearchOptions {
  int32_t block = 64;               // kernel_block
  int32_t last_q = 64;              // rows that estimate vertical-slash indices
  int32_t keep_first_columns = 30;  // always kept (the reference's search: 30)
  int32_t keep_last_diagonals = 30;
  int64_t skip_rows = 0;            // rows scored: skip_rows .. n - 1
  // Output search: every row_stride-th of those rows (skip_rows, skip_rows +
  // row_stride, ...); the recall search scores them all.
  int64_t row_stride = 1;
  double threshold = 5e-3;          // output search: an element deviates when |sparse - dense| > threshold
};

// What the output search found for one candidate.
struct OutputDeviation {
  int64_t deviating = 0;  // output elements off by more than the threshold
  int64_t elements = 0;   // output elements compared: scored rows x head_dim
  double share() const { return elements > 0 ? double(deviating) / double(elements) : 0.0; }
};

// The reference search's candidates (search_pattern in MInference), budgets
// multiplied by `scale` (rounded up): stream_llm (100, 800); vertical_and_slash
// (30, 800), (100, 750), (500, 700), (3500, 100); block_sparse keeping 1/8 of
// the blocks (here: top-k = ceil(blocks / 8) of the search prompt).
std::vector<Candidate> reference_candidates(double scale, int64_t n_tokens, int32_t block);

// Recall of each candidate for one head: q row t at q + t * q_stride, key j at
// k + j * k_stride, t, j < n, head_dim values each.
std::vector<double> candidate_recall(const float* q, int64_t q_stride, const float* k, int64_t k_stride, int64_t n,
                                     int64_t head_dim, const std::vector<Candidate>& candidates,
                                     const SearchOptions& options);

// Output deviation of each candidate for one head: as candidate_recall, with
// value row j at v + j * v_stride (the head's kv head). A row's output
// restricted to key set S is sum_{j in S} p_j v_j / sum_{j in S} p_j with the
// dense probabilities p (an empty S gives zeros, as the engine's kernel); the
// dense output is the same sum over every key the row sees.
std::vector<OutputDeviation> candidate_output_deviation(const float* q, int64_t q_stride, const float* k,
                                                        int64_t k_stride, const float* v, int64_t v_stride, int64_t n,
                                                        int64_t head_dim, const std::vector<Candidate>& candidates,
                                                        const SearchOptions& options);

// The counts a vertical_and_slash head runs with at `context` tokens, from its
// counts already scaled to that context: the reference's floors (at least 30
// verticals and 50 slashes), at most the context.
inline std::pair<int64_t, int64_t> vertical_slash_run_counts(int64_t verticals, int64_t slashes, int64_t context) {
  return {std::min(context, std::max<int64_t>(verticals, 30)), std::min(context, std::max<int64_t>(slashes, 50))};
}

// The reference's candidates as a run at n_tokens gives them (scaled, then the
// vertical_and_slash floors): what the search scores, so that a candidate is
// judged by the keys it will really read.
std::vector<Candidate> run_candidates(double scale, int64_t n_tokens, int32_t block);

// The winner of one head (the first of equal scores, higher is better: the
// recall, or 1 - the share of deviating output elements), as a file entry with
// that score. With `relabel`, the reference's relabelling: a winning
// stream_llm becomes vertical_and_slash with the same two numbers, a winning
// block_sparse becomes vertical_and_slash (1000, 6096) (scaled) — which is why
// its shipped files are almost all vertical_and_slash.
HeadPattern choose(const std::vector<Candidate>& candidates, const std::vector<double>& score, bool relabel,
                   double scale);

}  // namespace inferlab::minference
