// Quest's page bounds and selection by bound (cuda/page_bounds.cuh) against
// their CPU twins. Bounds must be bit-identical. Scores agree to a normalized
// error of 1e-5 (the GPU sums in another order), so selections are compared
// with the twin's exactly only where scores are far apart or exactly equal; on
// random scores the GPU's pages must be the best by its own scores.
#include <algorithm>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "cpu/cpu_twins.h"
#include "cuda/page_bounds.cuh"
#include "gpu_kernel_support.h"
#include "gpu_test_support.h"

namespace inferlab::kernels {
namespace test_cuda_page_bounds {

using gpu_test::DeviceBuffer;
using gpu_test::MirrorPool;
using gpu_test::param_name;
using gpu_test::shuffled_ids;
using gpu_test::to_bytes;
using gpu_test::normalized_error;
using gpu_test::random_floats;

// ---- bounds update ----------------------------------------------------------

struct UpdateCase {
  DType dtype;
  int32_t page_size, head_dim;
  std::string name() const {
    return std::string(dtype_name(dtype)) + "_page" + std::to_string(page_size) + "_hd" + std::to_string(head_dim);
  }
};

std::vector<UpdateCase> update_cases() {
  std::vector<UpdateCase> cases;
  for (DType dtype : {DType::F32, DType::F16, DType::BF16})
    for (int32_t page_size : {16, 7})
      for (int32_t head_dim : {64, 128}) cases.push_back({dtype, page_size, head_dim});
  return cases;
}

class PageBoundsUpdate : public testing::TestWithParam<UpdateCase> {};

// Every count 1 .. page_size, twice, on shuffled pages; the bounds of pages
// not listed keep their (random) bytes.
TEST_P(PageBoundsUpdate, MatchesTwinBitForBit) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const int32_t n_pool = 3 * c.page_size + 4, n = 2 * c.page_size;
  MirrorPool pool(c.dtype, n_pool, c.page_size, c.head_dim, 41);
  const auto order = shuffled_ids(n_pool, 42);
  const std::vector<int32_t> pages(order.begin(), order.begin() + n);
  std::vector<int32_t> counts;
  for (int32_t j = 0; j < n; ++j) counts.push_back(j % c.page_size + 1);
  auto bounds = to_bytes(random_floats(size_t(n_pool) * 2 * size_t(c.head_dim), 43), c.dtype);  // (n_pool, 2, head_dim)
  DeviceBuffer<uint8_t> d_bounds(bounds);
  DeviceBuffer<int32_t> d_pages(pages), d_counts(counts);
  INFERLAB_CUDA_OK(cuda::page_bounds_update(pool.device(), d_bounds.get(), d_pages.get(), d_counts.get(), n, nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  cpu::page_bounds_update(pool.host(), bounds.data(), pages.data(), counts.data(), n);
  EXPECT_EQ(d_bounds.download(), bounds);
}

INSTANTIATE_TEST_SUITE_P(Cuda, PageBoundsUpdate, testing::ValuesIn(update_cases()), param_name<UpdateCase>);

// ---- selection --------------------------------------------------------------

// How bounds and queries are drawn.
enum class Scores {
  Random,     // random bounds and queries
  Separated,  // page scores a distinct multiple of 64 * group_size apart, plus noise under 1
  Identical,  // every page has the same bounds: all scores equal
  ZeroQuery,  // all queries zero: all scores 0
  Levels,     // scores exactly group_size * {0, 1, 2}: many equal scores
};

const char* scores_name(Scores s) {
  switch (s) {
    case Scores::Random: return "random";
    case Scores::Separated: return "separated";
    case Scores::Identical: return "identical";
    case Scores::ZeroQuery: return "zeroquery";
    default: return "levels";
  }
}

struct SelectCase {
  Scores scores;
  DType dtype;
  int32_t group_size, head_dim, max_pages;
  std::string name() const {
    return std::string(scores_name(scores)) + "_" + dtype_name(dtype) + "_gs" + std::to_string(group_size) + "_hd" +
           std::to_string(head_dim) + "_pages" + std::to_string(max_pages);
  }
};

// One layer's selection on the host: kNumHeads kv heads over one pool of
// max_pages physical pages, each head's table row another shuffle of it.
// Head g holds max(2, max_pages - 3g) pages and keeps 1, 2, 17, all but one,
// or none (head 4) of them; its out slots start as kUntouched.
struct SelectProblem {
  static constexpr int32_t kNumHeads = 5, kPageSize = 16, kUntouched = -7;
  SelectCase c;
  int32_t stride = 0, score_stride = 0;
  std::vector<uint8_t> bounds;  // (max_pages, 2, head_dim) of dtype
  std::vector<int32_t> table;   // (kNumHeads, stride)
  std::vector<float> q;         // (kNumHeads * group_size, head_dim)
  std::vector<int32_t> n_cached, keep, out_offset, out;
  std::vector<float> scores;    // (kNumHeads, score_stride)

  int32_t pages_of(int32_t g) const { return (n_cached[size_t(g)] + kPageSize - 1) / kPageSize; }
  PageSelectCall call() {
    return {kNumHeads, c.group_size, c.head_dim, kPageSize, c.dtype, bounds.data(), {table.data(), stride},
            q.data(),  n_cached.data(), keep.data(), out_offset.data(), out.data(), scores.data(), score_stride};
  }
  void reset_out() { std::fill(out.begin(), out.end(), kUntouched); }
};

void fill_bounds_and_queries(SelectProblem& p, uint64_t seed) {
  const SelectCase& c = p.c;
  const int32_t hd = c.head_dim, n_phys = c.max_pages;
  std::vector<float> lo = random_floats(size_t(n_phys) * size_t(hd), seed), hi = random_floats(lo.size(), seed + 1);
  p.q = random_floats(size_t(SelectProblem::kNumHeads * c.group_size * hd), seed + 2);
  const auto rank = shuffled_ids(n_phys, uint32_t(seed + 3));  // of each physical page
  for (int32_t ph = 0; ph < n_phys; ++ph) {
    float* page_lo = lo.data() + int64_t(ph) * hd;
    float* page_hi = hi.data() + int64_t(ph) * hd;
    for (int32_t i = 0; i < hd; ++i) {
      if (c.scores == Scores::Separated) page_lo[i] *= 0.003f, page_hi[i] *= 0.003f;
      if (c.scores == Scores::Identical) page_lo[i] = lo[size_t(i)], page_hi[i] = hi[size_t(i)];
      if (c.scores == Scores::Levels) page_lo[i] = page_hi[i] = 0.0f;
      if (page_lo[i] > page_hi[i]) std::swap(page_lo[i], page_hi[i]);
    }
    const int32_t r = rank[size_t(ph)];
    if (c.scores == Scores::Separated) {
      // Channels 0 and 1 carry 256 * a + b exactly in every dtype (|a|, b <= 256).
      page_lo[0] = page_hi[0] = float(r / 256 - 128);
      page_lo[1] = page_hi[1] = float(r % 256);
    }
    if (c.scores == Scores::Levels) page_lo[0] = page_hi[0] = float(r % 3);
  }
  for (int32_t row = 0; row < SelectProblem::kNumHeads * c.group_size; ++row) {
    float* qr = p.q.data() + int64_t(row) * hd;
    if (c.scores == Scores::Separated) qr[0] = 256.0f * 64.0f, qr[1] = 64.0f;
    if (c.scores == Scores::Levels) qr[0] = 1.0f;
    if (c.scores == Scores::ZeroQuery) std::fill(qr, qr + hd, 0.0f);
  }
  p.bounds.clear();
  for (int32_t ph = 0; ph < n_phys; ++ph) {
    const auto row = [&](const std::vector<float>& x) {
      return std::vector<float>(x.begin() + int64_t(ph) * hd, x.begin() + int64_t(ph + 1) * hd);
    };
    for (const auto& part : {to_bytes(row(lo), c.dtype), to_bytes(row(hi), c.dtype)})
      p.bounds.insert(p.bounds.end(), part.begin(), part.end());
  }
}

SelectProblem make_problem(const SelectCase& c, uint64_t seed) {
  SelectProblem p;
  p.c = c;
  p.stride = c.max_pages + 3;
  p.score_stride = c.max_pages + 5;
  fill_bounds_and_queries(p, seed);
  const std::vector<int32_t> wanted = {1, 2, 17, c.max_pages, 0};
  for (int32_t g = 0; g < SelectProblem::kNumHeads; ++g) {
    const auto row = shuffled_ids(c.max_pages, uint32_t(seed) + 10 + uint32_t(g));
    p.table.insert(p.table.end(), row.begin(), row.end());
    p.table.resize(size_t(g + 1) * size_t(p.stride), -1);
    const int32_t n_pages = std::max(2, c.max_pages - 3 * g);
    p.n_cached.push_back((n_pages - 1) * SelectProblem::kPageSize + 1 + (5 * g) % SelectProblem::kPageSize);
    const int32_t w = wanted[size_t(g)];
    p.keep.push_back(w == 0 ? 0 : std::min(w, n_pages - 1));
    p.out_offset.push_back(g == 0 ? 0 : p.out_offset.back() + std::max(p.keep[size_t(g) - 1], 3));
  }
  p.out.resize(size_t(p.out_offset.back() + std::max(p.keep.back(), 3)));
  p.reset_out();
  p.scores.assign(size_t(SelectProblem::kNumHeads) * size_t(p.score_stride), 0.0f);
  return p;
}

// The problem's arrays on the device and the call over them.
struct DeviceProblem {
  DeviceBuffer<uint8_t> bounds;
  DeviceBuffer<int32_t> table, n_cached, keep, out_offset, out;
  DeviceBuffer<float> q, scores;
  PageSelectCall call;

  explicit DeviceProblem(SelectProblem& p)
      : bounds(p.bounds), table(p.table), n_cached(p.n_cached), keep(p.keep), out_offset(p.out_offset), out(p.out),
        q(p.q), scores(p.scores), call(p.call()) {
    call.bounds = bounds.get();
    call.table.pages = table.get();
    call.q = q.get();
    call.n_cached = n_cached.get();
    call.keep = keep.get();
    call.out_offset = out_offset.get();
    call.out = out.get();
    call.scores = scores.get();
  }
  // New queries, counts and keeps in the same buffers; out back to untouched.
  void upload(const SelectProblem& p) {
    q.upload(p.q);
    n_cached.upload(p.n_cached);
    keep.upload(p.keep);
    out.upload(p.out);
  }
};

// The twin's selection rule applied to given scores (the GPU's own).
std::vector<int32_t> best_pages(const float* score, int32_t n_pages, int32_t keep) {
  std::vector<int32_t> order(size_t(n_pages - 1));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](int32_t a, int32_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
  order.resize(size_t(keep - 1));
  std::sort(order.begin(), order.end());
  order.push_back(n_pages - 1);
  return order;
}

// Runs both and compares: scores at 1e-5; the GPU's pages are the best by its
// own scores; with exact_pages, the pages equal the twin's.
void expect_matches_twin(SelectProblem& p, DeviceProblem& d, bool exact_pages, const std::string& what) {
  const std::vector<float> gpu_scores = d.scores.download();
  const std::vector<int32_t> gpu_out = d.out.download();
  cpu::page_select(p.call());
  std::vector<float> got, expected;
  for (int32_t g = 0; g < SelectProblem::kNumHeads; ++g) {
    const int32_t n_pages = p.pages_of(g), keep = p.keep[size_t(g)], off = p.out_offset[size_t(g)];
    if (keep == 0) {
      for (int32_t j = 0; j < 3; ++j) {
        EXPECT_EQ(gpu_out[size_t(off + j)], SelectProblem::kUntouched) << what << " head " << g;
      }
      continue;
    }
    const size_t first = size_t(g) * size_t(p.score_stride);
    got.insert(got.end(), gpu_scores.begin() + first, gpu_scores.begin() + first + size_t(n_pages - 1));
    expected.insert(expected.end(), p.scores.begin() + first, p.scores.begin() + first + size_t(n_pages - 1));
    const std::vector<int32_t> gpu_pages(gpu_out.begin() + off, gpu_out.begin() + off + keep);
    EXPECT_EQ(gpu_pages, best_pages(gpu_scores.data() + first, n_pages, keep)) << what << " head " << g;
  }
  EXPECT_LT(normalized_error(got, expected), 1e-5) << what;
  if (exact_pages) {
    EXPECT_EQ(gpu_out, p.out) << what;
  }
}

std::vector<SelectCase> select_cases() {
  const std::vector<std::pair<int32_t, int32_t>> shapes = {{1, 64}, {3, 80}, {4, 128}};  // group size, head_dim
  std::vector<SelectCase> cases;
  for (DType dtype : {DType::F32, DType::F16, DType::BF16})
    for (auto [gs, hd] : shapes) {
      for (int32_t pages : {2, 3, 33, 1000, 8192}) cases.push_back({Scores::Separated, dtype, gs, hd, pages});
      for (int32_t pages : {777, 8192}) cases.push_back({Scores::Random, dtype, gs, hd, pages});
    }
  const std::vector<SelectCase> more = {
      {Scores::Separated, DType::F16, 4, 128, 65536}, {Scores::Random, DType::BF16, 4, 128, 65536},
      {Scores::Levels, DType::F32, 3, 80, 65536},     {Scores::Levels, DType::F16, 4, 128, 33},
      {Scores::Levels, DType::BF16, 1, 64, 1000},     {Scores::Levels, DType::F32, 4, 128, 8192},
      {Scores::Identical, DType::F16, 3, 80, 1000},   {Scores::Identical, DType::BF16, 4, 128, 8192},
      {Scores::ZeroQuery, DType::F32, 1, 64, 8192},   {Scores::ZeroQuery, DType::F16, 4, 128, 33}};
  cases.insert(cases.end(), more.begin(), more.end());
  return cases;
}

class PageBoundsSelect : public testing::TestWithParam<SelectCase> {};

TEST_P(PageBoundsSelect, MatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  SelectProblem p = make_problem(c, 51);
  DeviceProblem d(p);
  INFERLAB_CUDA_OK(cuda::page_select(d.call, c.max_pages, nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  expect_matches_twin(p, d, c.scores != Scores::Random, c.name());
}

INSTANTIATE_TEST_SUITE_P(Cuda, PageBoundsSelect, testing::ValuesIn(select_cases()), param_name<SelectCase>);

// Equal scores go to the lower pages: the twin's rule, spelled out.
TEST(PageBoundsSelectTies, IdenticalPagesKeepTheFirstPages) {
  INFERLAB_REQUIRE_GPU();
  SelectProblem p = make_problem({Scores::Identical, DType::BF16, 4, 128, 1000}, 52);
  DeviceProblem d(p);
  INFERLAB_CUDA_OK(cuda::page_select(d.call, 1000, nullptr));
  const auto out = d.out.download();
  for (int32_t g = 0; g < 4; ++g) {
    const int32_t keep = p.keep[size_t(g)];
    std::vector<int32_t> expected(static_cast<size_t>(keep));
    std::iota(expected.begin(), expected.end() - 1, 0);
    expected.back() = p.pages_of(g) - 1;
    EXPECT_EQ(std::vector<int32_t>(out.begin() + p.out_offset[size_t(g)], out.begin() + p.out_offset[size_t(g)] + keep),
              expected) << "head " << g;
  }
}

// One capture, replayed on new queries (the order reversed), counts and keeps.
TEST(PageBoundsSelectGraph, ReplayReadsNewQueriesCountsAndKeeps) {
  INFERLAB_REQUIRE_GPU();
  const int32_t max_pages = 1000;
  SelectProblem p = make_problem({Scores::Separated, DType::F16, 4, 128, max_pages}, 53);
  DeviceProblem d(p);
  cudaStream_t stream;
  INFERLAB_CUDA_OK(cudaStreamCreate(&stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  INFERLAB_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  INFERLAB_CUDA_OK(cuda::page_select(d.call, max_pages, stream));
  INFERLAB_CUDA_OK(cudaStreamEndCapture(stream, &graph));
  INFERLAB_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  INFERLAB_CUDA_OK(cudaGraphLaunch(exec, stream));
  INFERLAB_CUDA_OK(cudaStreamSynchronize(stream));
  expect_matches_twin(p, d, true, "first replay");

  p.reset_out();
  for (size_t row = 0; row < p.q.size(); row += size_t(p.c.head_dim)) p.q[row] = -p.q[row], p.q[row + 1] = -p.q[row + 1];
  p.n_cached[1] -= 100 * SelectProblem::kPageSize;
  p.keep = {0, 3, 17, 500, 1};  // within each head's out slots (3, 3, 17, 990, 3)
  d.upload(p);
  INFERLAB_CUDA_OK(cudaGraphLaunch(exec, stream));
  INFERLAB_CUDA_OK(cudaStreamSynchronize(stream));
  expect_matches_twin(p, d, true, "second replay");
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

// ---- selection per query head --------------------------------------------------

// Per query head (PageSelectCall::per_head): scores per query head, and each kv
// head's slots (group_size * (keep - 1) + 1 of them) hold the union of its
// heads' pages, with masks beside. alternate: odd heads of a group negate the
// separating channels, so they rank the pages in the opposite order.
struct PerHeadProblem {
  SelectProblem p;
  std::vector<uint32_t> heads, marks;
  PageSelectCall call() {
    PageSelectCall c = p.call();
    c.per_head = 1;
    c.out_heads = heads.data();
    c.marks = marks.data();
    return c;
  }
};

PerHeadProblem make_per_head_problem(const SelectCase& c, uint64_t seed, bool alternate) {
  PerHeadProblem h{make_problem(c, seed), {}, {}};
  SelectProblem& p = h.p;
  const int32_t gs = c.group_size, n = SelectProblem::kNumHeads;
  for (int32_t row = 0; alternate && row < n * gs; ++row)
    if (row % gs % 2 == 1) {
      float* q = p.q.data() + int64_t(row) * c.head_dim;
      q[0] = -q[0];
      q[1] = -q[1];
    }
  int32_t at = 0;
  for (int32_t g = 0; g < n; ++g) {
    p.out_offset[size_t(g)] = at;
    at += std::max(gs * (p.keep[size_t(g)] - 1) + 1, 3);
  }
  p.out.assign(size_t(at), SelectProblem::kUntouched);
  h.heads.assign(size_t(at), 0xdeadbeefu);
  p.scores.assign(size_t(n) * size_t(gs) * size_t(p.score_stride), 0.0f);
  h.marks.assign(size_t(n) * size_t(p.score_stride), 0u);
  return h;
}

// Scores per head at 1e-5 of the twin's; each kv head's slots are the union of
// its heads' best pages by the GPU's own scores (unused slots -1 first, masks
// beside); with exact, slots and masks equal the twin's.
void expect_union_matches_twin(PerHeadProblem& h, DeviceProblem& d, const DeviceBuffer<uint32_t>& heads, bool exact,
                               const std::string& what) {
  SelectProblem& p = h.p;
  const int32_t gs = p.c.group_size;
  const std::vector<float> gpu_scores = d.scores.download();
  const std::vector<int32_t> gpu_out = d.out.download();
  const std::vector<uint32_t> gpu_heads = heads.download();
  cpu::page_select(h.call());
  std::vector<float> got, expected;
  for (int32_t g = 0; g < SelectProblem::kNumHeads; ++g) {
    const int32_t n_pages = p.pages_of(g), keep = p.keep[size_t(g)], off = p.out_offset[size_t(g)];
    if (keep == 0) {
      for (int32_t j = 0; j < 3; ++j) {
        EXPECT_EQ(gpu_out[size_t(off + j)], SelectProblem::kUntouched) << what << " head " << g;
      }
      continue;
    }
    std::map<int32_t, uint32_t> chosen;  // page -> the heads that chose it
    for (int32_t j = 0; j < gs; ++j) {
      const size_t first = (size_t(g) * size_t(gs) + size_t(j)) * size_t(p.score_stride);
      got.insert(got.end(), gpu_scores.begin() + first, gpu_scores.begin() + first + size_t(n_pages - 1));
      expected.insert(expected.end(), p.scores.begin() + first, p.scores.begin() + first + size_t(n_pages - 1));
      for (int32_t page : best_pages(gpu_scores.data() + first, n_pages, keep)) chosen[page] |= 1u << j;
    }
    const int32_t slots = gs * (keep - 1) + 1;
    std::vector<int32_t> want_out(size_t(slots) - chosen.size(), -1);
    std::vector<uint32_t> want_heads(want_out.size(), 0u);
    for (const auto& [page, mask] : chosen) {
      want_out.push_back(page);
      want_heads.push_back(mask);
    }
    EXPECT_EQ(std::vector<int32_t>(gpu_out.begin() + off, gpu_out.begin() + off + slots), want_out)
        << what << " head " << g;
    EXPECT_EQ(std::vector<uint32_t>(gpu_heads.begin() + off, gpu_heads.begin() + off + slots), want_heads)
        << what << " head " << g;
  }
  EXPECT_LT(normalized_error(got, expected), 1e-5) << what;
  if (exact) {
    EXPECT_EQ(gpu_out, p.out) << what;
    EXPECT_EQ(gpu_heads, h.heads) << what;
  }
}

std::vector<SelectCase> per_head_cases() {
  std::vector<SelectCase> cases;
  for (DType dtype : {DType::F32, DType::F16, DType::BF16})
    for (auto [gs, hd] : {std::pair{1, 64}, std::pair{3, 80}, std::pair{4, 128}}) {
      for (int32_t pages : {2, 3, 33, 1000}) cases.push_back({Scores::Separated, dtype, gs, hd, pages});
      cases.push_back({Scores::Random, dtype, gs, hd, 777});
    }
  const std::vector<SelectCase> more = {{Scores::Levels, DType::F16, 4, 128, 1000},
                                        {Scores::Identical, DType::BF16, 3, 80, 1000},
                                        {Scores::ZeroQuery, DType::F32, 4, 128, 33},
                                        {Scores::Separated, DType::F16, 4, 128, 8192}};
  cases.insert(cases.end(), more.begin(), more.end());
  return cases;
}

class PageBoundsSelectPerHead : public testing::TestWithParam<SelectCase> {};

TEST_P(PageBoundsSelectPerHead, MatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  PerHeadProblem h = make_per_head_problem(c, 54, c.scores == Scores::Separated);
  DeviceProblem d(h.p);
  DeviceBuffer<uint32_t> heads(h.heads), marks(h.marks);
  d.call.per_head = 1;
  d.call.out_heads = heads.get();
  d.call.marks = marks.get();
  INFERLAB_CUDA_OK(cuda::page_select(d.call, c.max_pages, nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  expect_union_matches_twin(h, d, heads, c.scores != Scores::Random, c.name());
  // Run again on the same buffers: the marks are cleared by the launch itself.
  INFERLAB_CUDA_OK(cuda::page_select(d.call, c.max_pages, nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  expect_union_matches_twin(h, d, heads, c.scores != Scores::Random, c.name() + " again");
}

INSTANTIATE_TEST_SUITE_P(Cuda, PageBoundsSelectPerHead, testing::ValuesIn(per_head_cases()), param_name<SelectCase>);

TEST(PageBoundsArguments, LaunchersRejectBadSizes) {
  INFERLAB_REQUIRE_GPU();
  MirrorPool pool(DType::F16, 5, 16, 64, 61);
  DeviceBuffer<int32_t> ids(4);
  DeviceBuffer<uint8_t> bounds(5 * 2 * 64 * 2);
  const KvPages no_pages{};
  EXPECT_EQ(cuda::page_bounds_update(no_pages, bounds.get(), ids.get(), ids.get(), 1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::page_bounds_update(pool.device(), bounds.get(), ids.get(), ids.get(), -1, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::page_bounds_update(pool.device(), nullptr, ids.get(), ids.get(), 1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::page_bounds_update(pool.device(), bounds.get(), ids.get(), nullptr, 1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::page_bounds_update(pool.device(), nullptr, nullptr, nullptr, 0, nullptr), cudaSuccess);

  SelectProblem p = make_problem({Scores::Random, DType::F16, 2, 64, 8}, 62);
  DeviceProblem d(p);
  const auto rejects = [&](auto edit, int32_t max_pages) {
    PageSelectCall call = d.call;
    edit(call);
    return cuda::page_select(call, max_pages, nullptr) == cudaErrorInvalidValue;
  };
  EXPECT_TRUE(rejects([](PageSelectCall& c) { c.bounds = nullptr; }, 8));
  EXPECT_TRUE(rejects([](PageSelectCall& c) { c.scores = nullptr; }, 8));
  EXPECT_TRUE(rejects([](PageSelectCall& c) { c.n_kv_heads = -1; }, 8));
  EXPECT_TRUE(rejects([](PageSelectCall& c) { c.group_size = 0; }, 8));
  EXPECT_TRUE(rejects([](PageSelectCall& c) { c.dtype = DType(7); }, 8));
  EXPECT_TRUE(rejects([](PageSelectCall&) {}, -1));
  EXPECT_TRUE(rejects([](PageSelectCall&) {}, p.score_stride + 1));
  DeviceBuffer<uint32_t> per_head_buffer(size_t(p.score_stride) * 5);
  const auto per_head = [&](PageSelectCall& c) {
    c.per_head = 1;
    c.out_heads = per_head_buffer.get();
    c.marks = per_head_buffer.get();
  };
  EXPECT_TRUE(rejects([&](PageSelectCall& c) {
    per_head(c);
    c.out_heads = nullptr;
  }, 8));
  EXPECT_TRUE(rejects([&](PageSelectCall& c) {
    per_head(c);
    c.marks = nullptr;
  }, 8));
  EXPECT_TRUE(rejects([&](PageSelectCall& c) {
    per_head(c);
    c.group_size = 33;
  }, 8));
  PageSelectCall empty = d.call;
  empty.n_kv_heads = 0;
  EXPECT_EQ(cuda::page_select(empty, 8, nullptr), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace test_cuda_page_bounds
}  // namespace inferlab::kernels
