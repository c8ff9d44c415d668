// The tiled CPU attention (online softmax over key tiles, split-key merges)
// against the exact two-pass reference, attention_paged.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "cpu/attention_tiled.h"
#include "cpu/cpu_ops.h"

namespace inferlab {
namespace test_attention_tiled {

namespace cpu = kernels::cpu;

struct Case {
  int64_t head_dim = 64;
  int64_t n_heads = 3;              // query heads of the group
  std::vector<int32_t> page_sizes;  // the concatenation's pages
  std::vector<int32_t> visible;     // per query row
};

struct Data {
  std::vector<std::vector<float>> k, v;
  std::vector<cpu::KvPageRef> refs;
  std::vector<float> q;
  int64_t n_keys = 0;
};

Data make_data(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Data d;
  for (const int32_t n : c.page_sizes) {
    d.k.emplace_back(size_t(n * c.head_dim));
    d.v.emplace_back(size_t(n * c.head_dim));
    for (auto& x : d.k.back()) x = 2.0f * dist(rng);  // spread scores, so the softmax is peaked
    for (auto& x : d.v.back()) x = dist(rng);
    d.n_keys += n;
  }
  for (size_t p = 0; p < c.page_sizes.size(); ++p) d.refs.push_back({d.k[p].data(), d.v[p].data(), c.page_sizes[p]});
  d.q.resize(c.visible.size() * size_t(c.n_heads * c.head_dim));
  for (auto& x : d.q) x = dist(rng);
  return d;
}

// Reference: each query vector alone through attention_paged.
std::vector<float> reference(const Case& c, const Data& d) {
  const int64_t rows = int64_t(c.visible.size()), width = c.n_heads * c.head_dim;
  std::vector<float> out(size_t(rows * width));
  const float scale = 1.0f / std::sqrt(float(c.head_dim));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < c.n_heads; ++j)
      cpu::attention_paged(&d.q[size_t(i * width + j * c.head_dim)], 1, width, d.refs.data(), int64_t(d.refs.size()),
                           &c.visible[size_t(i)], c.head_dim, scale, &out[size_t(i * width + j * c.head_dim)], width,
                           nullptr);
  return out;
}

cpu::QueryTile tile_of(const Case& c, const Data& d, std::vector<float>& out) {
  const int64_t width = c.n_heads * c.head_dim;
  out.assign(c.visible.size() * size_t(width), -1.0f);
  return cpu::QueryTile{d.q.data(), int64_t(c.visible.size()), c.n_heads, width, c.head_dim, c.visible.data(),
                        out.data(), width, c.head_dim};
}

void expect_close(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 2e-5f + 2e-5f * std::abs(want[i])) << "at " << i;
}

std::vector<Case> cases() {
  std::vector<Case> out;
  // Prefill-like: causal rows over pages of 16, the first rows seeing a cached prefix.
  for (const int64_t hd : {64, 128, 8, 24}) {
    Case c{hd, 3, {16, 16, 16, 16, 16, 7}, {}};
    for (int32_t i = 0; i < 20; ++i) c.visible.push_back(67 + i - 19);
    out.push_back(c);
  }
  // Decode-like: one row, ragged pages (a Quest selection), every key visible.
  out.push_back({64, 3, {16, 3, 16, 16, 1, 16, 40}, {108}});
  // Rows that see nothing, one key, and a tile's last key exactly.
  out.push_back({64, 2, {32, 32}, {0, 1, 32, 33, 64}});
  // One head, many keys (several tiles), short pages.
  out.push_back({64, 1, std::vector<int32_t>(50, 5), {250, 7, 31}});
  return out;
}

TEST(AttentionTiled, MatchesTheExactReference) {
  uint32_t seed = 1;
  for (const Case& c : cases()) {
    SCOPED_TRACE(::testing::Message() << "head_dim " << c.head_dim << ", rows " << c.visible.size());
    ASSERT_TRUE(cpu::attention_tiled_supports(c.head_dim));
    const Data d = make_data(c, seed++);
    std::vector<float> out;
    const cpu::QueryTile tile = tile_of(c, d, out);
    cpu::attention_tiled(tile, d.refs.data(), int64_t(d.refs.size()), c.head_dim, 1.0f / std::sqrt(float(c.head_dim)));
    expect_close(out, reference(c, d));
  }
}

TEST(AttentionTiled, SplitKeysMergeToTheWholeAttention) {
  uint32_t seed = 100;
  for (const Case& c : cases()) {
    const Data d = make_data(c, seed++);
    std::vector<float> out;
    const cpu::QueryTile tile = tile_of(c, d, out);
    const int64_t nv = tile.n_vectors();
    // Splits of uneven size, one of them empty, one past the end.
    const std::vector<int64_t> bounds{0, 5, 5, std::min<int64_t>(40, d.n_keys / 2), d.n_keys / 2 + 3, d.n_keys + 10};
    std::vector<std::vector<float>> o(bounds.size() - 1), m(o.size()), l(o.size());
    std::vector<cpu::SoftmaxPartial> parts;
    for (size_t s = 0; s + 1 < bounds.size(); ++s) {
      o[s].resize(size_t(nv * c.head_dim));
      m[s].resize(size_t(nv));
      l[s].resize(size_t(nv));
      parts.push_back({o[s].data(), m[s].data(), l[s].data()});
      cpu::attention_tiled_partial(tile, d.refs.data(), int64_t(d.refs.size()), c.head_dim,
                                   1.0f / std::sqrt(float(c.head_dim)), bounds[s], bounds[s + 1], parts.back());
    }
    EXPECT_TRUE(std::isinf(m[1][0]) && l[1][0] == 0.0f) << "the empty split saw keys";
    cpu::attention_merge(tile, parts.data(), int64_t(parts.size()), c.head_dim);
    expect_close(out, reference(c, d));
  }
}

TEST(AttentionTiled, KeyMassFromTheFinalStatisticsMatchesTheReference) {
  uint32_t seed = 200;
  for (const Case& c : cases()) {
    const Data d = make_data(c, seed++);
    const float scale = 1.0f / std::sqrt(float(c.head_dim));
    const int64_t rows = int64_t(c.visible.size()), width = c.n_heads * c.head_dim;
    for (int64_t j = 0; j < c.n_heads; ++j) {  // the statistics are per query head
      std::vector<float> want(size_t(d.n_keys), 0.0f), got(size_t(d.n_keys), 0.0f), out(size_t(rows * width));
      std::vector<float> o(size_t(rows * c.head_dim)), ml(size_t(2 * rows));
      for (int64_t i = 0; i < rows; ++i)
        cpu::attention_paged(&d.q[size_t(i * width + j * c.head_dim)], 1, width, d.refs.data(),
                             int64_t(d.refs.size()), &c.visible[size_t(i)], c.head_dim, scale, out.data(), width,
                             want.data());
      const cpu::QueryTile tile{&d.q[size_t(j * c.head_dim)], rows, 1, width, 0, c.visible.data(), nullptr, 0, 0};
      const cpu::SoftmaxPartial part{o.data(), ml.data(), ml.data() + rows};
      cpu::attention_tiled_partial(tile, d.refs.data(), int64_t(d.refs.size()), c.head_dim, scale, 0, d.n_keys, part);
      cpu::attention_key_mass(tile, d.refs.data(), int64_t(d.refs.size()), c.head_dim, scale, part.m, part.l,
                              got.data());
      double total = 0;
      for (size_t t = 0; t < got.size(); ++t) {
        ASSERT_NEAR(got[t], want[t], 1e-5f + 1e-5f * want[t]) << "key " << t;
        total += got[t];
      }
      // Each row that sees a key hands out a probability mass of one.
      EXPECT_NEAR(total, double(std::count_if(c.visible.begin(), c.visible.end(), [](int32_t v) { return v > 0; })),
                  1e-4);
    }
  }
}

TEST(AttentionTiled, ARowThatSeesNoKeyIsZero) {
  Case c{64, 3, {16}, {0, 0}};
  const Data d = make_data(c, 7);
  std::vector<float> out;
  const cpu::QueryTile tile = tile_of(c, d, out);
  cpu::attention_tiled(tile, d.refs.data(), 1, 64, 0.125f);
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return x == 0.0f; }));
}

TEST(AttentionTiled, ExtremeScoresStayFinite) {
  // Scores near +-1e3 in the log2 domain: the online max keeps every exponent <= 0.
  Case c{64, 1, {16, 16}, {32}};
  Data d = make_data(c, 9);
  for (auto& x : d.k[0]) x *= 300.0f;
  std::vector<float> out;
  const cpu::QueryTile tile = tile_of(c, d, out);
  cpu::attention_tiled(tile, d.refs.data(), 2, 64, 0.125f);
  for (const float x : out) ASSERT_TRUE(std::isfinite(x));
  expect_close(out, reference(c, d));
}

TEST(AttentionTiled, HeadSizesItDoesNotHandleAreRefused) {
  EXPECT_FALSE(cpu::attention_tiled_supports(0));
  EXPECT_FALSE(cpu::attention_tiled_supports(20));
  EXPECT_FALSE(cpu::attention_tiled_supports(512));
  EXPECT_TRUE(cpu::attention_tiled_supports(256));
}

}  // namespace test_attention_tiled
}  // namespace inferlab
