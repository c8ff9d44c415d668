// MInference's offline pattern search, per query head, on the queries and keys
// (after RoPE) of a calibration prompt: the dense attention probabilities of
// the head, then for each candidate pattern the share of that probability
// mass the pattern keeps (its attention recall), averaged over the rows from
// `skip_rows` on; the candidate with the highest recall wins. Each candidate
// keeps the keys the engine's sparse kernel would compute for it
// (PrefillPattern): vertical-slash diagonals as block-wide ranges along the
// diagonal, A-shape windows per query block, top-k blocks by mean-pooled
// scores. (The reference scores single diagonals and 32-token blocks, what its
// search script builds, not what its kernels compute.)
#pragma once

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
  int64_t skip_rows = 0;            // rows averaged: skip_rows .. n - 1
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

// The winner of one head (the first of equal recalls), as a file entry with
// its recall as score. With `relabel`, the reference's relabelling: a winning
// stream_llm becomes vertical_and_slash with the same two numbers, a winning
// block_sparse becomes vertical_and_slash (1000, 6096) (scaled) — which is why
// its shipped files are almost all vertical_and_slash.
HeadPattern choose(const std::vector<Candidate>& candidates, const std::vector<double>& recall, bool relabel,
                   double scale);

}  // namespace inferlab::minference
