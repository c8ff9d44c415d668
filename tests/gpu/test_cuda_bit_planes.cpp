// Attention over bit-plane KV pages (SpAtten's progressive quantization) on
// the GPU: value_topk.cu's attention_progressive against its twin
// cpu::attention_row_progressive row by row, on random paged cases
// (selections, per-query-head keys, head masks, value pruning, rows in
// passes) with a threshold between the rows' largest MSB-plane
// probabilities, and on crafted rows just above and just below the threshold
// whose keys tie. The records kv_append writes are compared byte for byte in
// test_cuda_ops.cpp; the engine on bit-plane pages in test_cuda_engine_bit_planes.cpp.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "attention_case.h"
#include "cpu/attention_twin.h"
#include "cpu/cpu_ops.h"
#include "cpu/cpu_twins.h"
#include "cuda/attention.cuh"
#include "cuda/value_topk.cuh"
#include "gpu_kernel_support.h"
#include "gpu_test_support.h"

namespace inferlab::test {
namespace test_cuda_bit_planes {

using gpu_test::DeviceBuffer;
using gpu_test::normalized_error;
using kernels::BitPlanes;
using kernels::DType;
namespace cpu = kernels::cpu;

// An attention case (attention_case.h: page tables, selections, head masks,
// queries) whose pages hold its K and V rows as bit-plane records; slots no
// token uses hold 0xff bytes (a NaN scale), so a kernel reading one shows it.
struct PlaneCase {
  AttentionCase element;
  BitPlanes planes;
  kernels::KvPages kv;  // host chunks
  std::vector<std::vector<uint8_t>> chunks;
  std::vector<void*> chunk_base;

  uint8_t* key_record(int32_t g, int32_t t) {
    const int32_t page = element.table[size_t(g * element.table_stride + t / kv.page_size)];
    return chunks[size_t(page / kv.pages_per_chunk)].data() +
           (int64_t(page % kv.pages_per_chunk) * 2 * kv.page_size + t % kv.page_size) * kv.row_bytes();
  }
  uint8_t* value_record(int32_t g, int32_t t) { return key_record(g, t) + int64_t(kv.page_size) * kv.row_bytes(); }
};

PlaneCase make_plane_case(const AttentionSpec& spec, BitPlanes planes) {
  PlaneCase c{make_attention_case(spec), planes, {}, {}, {}};
  const AttentionCase& a = c.element;
  c.kv = {nullptr, a.pages_per_chunk, spec.page_size, spec.head_dim, DType::F16, planes};
  c.chunks.assign(a.chunks.size(), std::vector<uint8_t>(size_t(a.pages_per_chunk * c.kv.page_bytes()), 0xff));
  for (auto& chunk : c.chunks) c.chunk_base.push_back(chunk.data());
  c.kv.chunk_base = c.chunk_base.data();
  const int64_t hd = spec.head_dim;
  for (int32_t g = 0; g < spec.n_kv_heads; ++g)
    for (int32_t t = 0; t < a.n_cached[size_t(g)] + spec.n_rows; ++t) {
      const size_t at = (size_t(g) * size_t(a.max_stored) + size_t(t)) * size_t(hd);
      cpu::bit_plane_encode(&a.k[at], hd, planes, c.key_record(g, t));
      cpu::bit_plane_encode(&a.v[at], hd, planes, c.value_record(g, t));
    }
  return c;
}

// Device copies of a case and the call that points at them.
struct DevicePlanes {
  std::vector<DeviceBuffer<uint8_t>> chunks;
  DeviceBuffer<void*> chunk_base;
  DeviceBuffer<int32_t> table, n_cached, select_indptr, select_index;
  DeviceBuffer<uint8_t> select, head_active;
  DeviceBuffer<uint32_t> select_heads;
  DeviceBuffer<float> q, out, key_mass;
  kernels::AttentionCall call;

  static std::vector<DeviceBuffer<uint8_t>> upload(const PlaneCase& c) {
    std::vector<DeviceBuffer<uint8_t>> out;
    for (const auto& chunk : c.chunks) out.emplace_back(chunk);
    return out;
  }
  static std::vector<void*> pointers(const std::vector<DeviceBuffer<uint8_t>>& chunks) {
    std::vector<void*> out;
    for (const auto& chunk : chunks) out.push_back(chunk.get());
    return out;
  }
  explicit DevicePlanes(PlaneCase& c)
      : chunks(upload(c)),
        chunk_base(pointers(chunks)),
        table(c.element.table),
        n_cached(c.element.n_cached),
        select_indptr(c.element.select_indptr),
        select_index(c.element.select_index),
        select(c.element.select),
        head_active(c.element.head_active),
        select_heads(c.element.select_heads),
        q(c.element.q),
        out(c.element.out),  // NaN: every element must be written
        key_mass(c.element.key_mass),
        call(c.element.call()) {
    const AttentionCase& a = c.element;
    call.kv = c.kv;
    call.kv.chunk_base = chunk_base.get();
    call.q = q.get();
    call.out = out.get();
    call.n_cached = n_cached.get();
    call.table.pages = table.get();
    call.select = a.select.empty() ? nullptr : select.get();
    call.select_indptr = a.select.empty() ? nullptr : select_indptr.get();
    call.select_index = a.select.empty() || a.select_index.empty() ? nullptr : select_index.get();
    call.select_heads = a.select_heads.empty() ? nullptr : select_heads.get();
    call.head_active = a.head_active.empty() ? nullptr : head_active.get();
    call.key_mass = a.key_mass.empty() ? nullptr : key_mass.get();
  }
};

bool head_on(const AttentionCase& a, int32_t h) { return a.head_active.empty() || a.head_active[size_t(h)] != 0; }

// The keys row r of query head h reads, in the kernel's order (its selected
// cached tokens, then the new rows up to r), one page reference each.
std::vector<cpu::KvPageRef> row_refs(PlaneCase& c, int32_t h, int32_t r, bool lsb, std::vector<int32_t>* tokens) {
  const AttentionCase& a = c.element;
  const int32_t gs = a.spec.n_heads / a.spec.n_kv_heads, g = h / gs;
  std::vector<int32_t> keys = cpu::selected_cached_tokens(c.element.call(), g, h - g * gs);
  for (int32_t i = 0; i <= r; ++i) keys.push_back(a.n_cached[size_t(g)] + i);
  std::vector<cpu::KvPageRef> refs;
  for (int32_t t : keys) refs.push_back({c.key_record(g, t), c.value_record(g, t), 1, DType::F32, c.planes, lsb});
  if (tokens != nullptr) *tokens = keys;
  return refs;
}

// Expected results of one launch, from the twin.
struct TwinResult {
  std::vector<float> out, mass;
  std::vector<int32_t> requant;  // (n_heads, n_rows, 3)
  std::vector<uint8_t> kept;     // (n_heads, max_keys): the last row's
};

TwinResult run_twin(PlaneCase& c, bool msb_first, float threshold, double keep, bool renormalize) {
  const AttentionCase& a = c.element;
  const AttentionSpec& s = a.spec;
  const int32_t hd = s.head_dim, gs = s.n_heads / s.n_kv_heads, max_keys = a.max_keys();
  TwinResult t{std::vector<float>(a.q.size(), 0.0f), std::vector<float>(a.key_mass.size(), 0.0f),
               std::vector<int32_t>(size_t(s.n_heads * s.n_rows * 3), 0),
               std::vector<uint8_t>(size_t(s.n_heads) * size_t(max_keys), 0)};
  std::vector<float> probs(static_cast<size_t>(max_keys));
  std::vector<uint8_t> kept(static_cast<size_t>(max_keys));
  for (int32_t h = 0; h < s.n_heads; ++h) {
    if (!head_on(a, h)) continue;
    const int32_t g = h / gs;
    for (int32_t r = 0; r < s.n_rows; ++r) {
      std::vector<int32_t> tokens;
      const auto refs = row_refs(c, h, r, true, &tokens);
      const int64_t visible = int64_t(refs.size()), cached = visible - r - 1;
      const int64_t at = (int64_t(r) * s.n_heads + h) * hd;
      // Without msb_first every row reads both planes: the twin refetches every row.
      const bool refetched =
          cpu::attention_row_progressive(a.q.data() + at, refs.data(), visible, visible, hd, 1.0f / std::sqrt(float(hd)),
                                         keep, renormalize, msb_first ? threshold : 2.0f, t.out.data() + at,
                                         probs.data(), kept.data());
      if (!t.mass.empty())
        for (int64_t j = 0; j < visible; ++j) t.mass[size_t(g * a.mass_stride + tokens[size_t(j)])] += probs[size_t(j)];
      if (msb_first && refetched) {
        int32_t* q = &t.requant[size_t((h * s.n_rows + r) * 3)];
        q[0] = 1;
        q[1] = int32_t(cached);
        q[2] = int32_t(std::count(kept.begin(), kept.begin() + cached, uint8_t{1}));
      }
      if (r == s.n_rows - 1) std::copy(kept.begin(), kept.begin() + visible, t.kept.begin() + int64_t(h) * max_keys);
    }
  }
  return t;
}

// The largest MSB-plane probability of every computed (head, row).
std::vector<float> msb_largest(PlaneCase& c) {
  const AttentionCase& a = c.element;
  const AttentionSpec& s = a.spec;
  std::vector<float> largest, probs(static_cast<size_t>(a.max_keys())), out(static_cast<size_t>(s.head_dim));
  for (int32_t h = 0; h < s.n_heads; ++h)
    for (int32_t r = 0; r < s.n_rows && head_on(a, h); ++r) {
      const auto refs = row_refs(c, h, r, false, nullptr);
      const int64_t visible = int64_t(refs.size());
      cpu::attention_row_value_topk(a.q.data() + (int64_t(r) * s.n_heads + h) * s.head_dim, refs.data(), visible,
                                    visible, s.head_dim, 1.0f / std::sqrt(float(s.head_dim)), 1.0, false, out.data(),
                                    probs.data(), nullptr);
      largest.push_back(*std::max_element(probs.begin(), probs.begin() + visible));
    }
  return largest;
}

// A threshold in the widest relative gap between the middle half of the
// sorted values, so no row sits within rounding of it.
float threshold_between(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  if (v.size() < 2) {
    ADD_FAILURE() << "fewer than two rows to put a threshold between";
    return 0.5f;
  }
  const size_t n = v.size(), lo = std::min(n / 4, n - 2), hi = std::max(lo, std::min(3 * n / 4, n - 2));
  size_t best = lo;
  for (size_t i = lo; i <= hi; ++i)
    if ((v[i + 1] - v[i]) / v[i + 1] > (v[best + 1] - v[best]) / v[best + 1]) best = i;
  EXPECT_GT((v[best + 1] - v[best]) / v[best + 1], 1e-3f) << "the rows' largest probabilities are too close";
  return 0.5f * (v[best] + v[best + 1]);
}

struct Launch {
  std::vector<float> out, mass;
  std::vector<int32_t> requant;
  std::vector<uint8_t> kept;
};

// attention_progressive with scratch for `pass_rows` rows at a time.
Launch run_device(PlaneCase& c, bool msb_first, float threshold, double keep, bool renormalize, int32_t pass_rows) {
  DevicePlanes dev(c);
  const AttentionSpec& s = c.element.spec;
  const int32_t max_keys = c.element.max_keys();
  DeviceBuffer<uint8_t> scratch(kernels::cuda::value_topk_row_scratch_bytes(dev.call, max_keys) * size_t(pass_rows));
  DeviceBuffer<int32_t> requant(std::vector<int32_t>(size_t(s.n_heads * s.n_rows * 3), -7));
  DeviceBuffer<uint8_t> kept(std::vector<uint8_t>(size_t(s.n_heads) * size_t(max_keys), 0));
  Launch got;
  EXPECT_EQ(kernels::cuda::attention_progressive(dev.call, max_keys, msb_first, threshold, keep, renormalize,
                                                 kept.get(), requant.get(), scratch.get(), scratch.size(), nullptr),
            cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  got.out = dev.out.download();
  got.mass = dev.key_mass.download();
  got.requant = requant.download();
  got.kept = kept.download();
  return got;
}

struct ProgressiveCase {
  std::string label;
  BitPlanes planes;
  int32_t rows, head_dim;
  AttentionSpec::Select select;
  bool head_selects;
  double keep;
  bool renormalize;
  int32_t pass_rows;  // rows per pass the scratch holds
  uint64_t seed;      // one whose head mask leaves several heads on
  std::string name() const { return label; }
};

class CudaAttentionBitPlanes : public testing::TestWithParam<ProgressiveCase> {};

// Outputs and key mass within float rounding of the twin (both decode the same
// records exactly); the refetch decision, the cached keys read and the kept
// cached values exactly, the threshold lying in a wide gap between rows.
TEST_P(CudaAttentionBitPlanes, MatchesTheTwinRowByRow) {
  INFERLAB_REQUIRE_GPU();
  const ProgressiveCase& p = GetParam();
  AttentionSpec spec;
  spec.n_rows = p.rows;
  spec.n_heads = 8;
  spec.n_kv_heads = 2;
  spec.head_dim = p.head_dim;
  spec.n_cached = 300;
  spec.cached_step = 7;
  spec.select = p.select;
  spec.head_selects = p.head_selects;
  spec.head_mask = true;
  spec.stats = true;
  spec.seed = p.seed;
  PlaneCase c = make_plane_case(spec, p.planes);
  const float threshold = threshold_between(msb_largest(c));
  for (bool msb_first : {true, false}) {
    const std::string what = fmt::format("{} msb_first {}", p.label, msb_first);
    const Launch got = run_device(c, msb_first, threshold, p.keep, p.renormalize, p.pass_rows);
    const TwinResult want = run_twin(c, msb_first, threshold, p.keep, p.renormalize);
    for (float x : got.out) ASSERT_TRUE(std::isfinite(x)) << what << ": unwritten or NaN output";
    EXPECT_LT(normalized_error(got.out, want.out), 1e-4) << what;
    EXPECT_LT(normalized_error(got.mass, want.mass), 1e-4) << what << " key_mass";
    EXPECT_EQ(got.requant, want.requant) << what << " (refetched, cached keys, kept cached values) per (head, row)";
    int64_t refetched = 0;
    for (size_t i = 0; i < got.requant.size(); i += 3) refetched += got.requant[i];
    if (msb_first) {
      EXPECT_GT(refetched, 0) << what << ": the threshold refetched nothing";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CudaAttentionBitPlanes,
    testing::Values(
        ProgressiveCase{"planes4_4_decode", {4, 4}, 1, 64, AttentionSpec::Select::None, false, 1.0, false, 1, 56},
        ProgressiveCase{"planes6_4_rows5_mixed_values", {6, 4}, 5, 64, AttentionSpec::Select::Mixed, false, 0.3, true,
                        2, 36},
        ProgressiveCase{"planes2_6_rows3_head_selects", {2, 6}, 3, 64, AttentionSpec::Select::Mixed, true, 1.0, false,
                        3, 34},
        ProgressiveCase{"planes3_5_hd128_values", {3, 5}, 4, 128, AttentionSpec::Select::Tokens, false, 0.5, false, 1,
                        35},
        ProgressiveCase{"planes8_0_pages", {8, 0}, 2, 64, AttentionSpec::Select::Pages, false, 1.0, false, 2, 33}),
    gpu_test::param_name<ProgressiveCase>);

// Value i's MSB bits of a record (bit_planes.h's packing).
void set_msb(uint8_t* record, int64_t i, BitPlanes p, uint32_t value) {
  uint8_t* plane = record + 4;
  for (int32_t b = 0; b < p.msb; ++b) {
    const int64_t bit = i * p.msb + b;
    plane[bit >> 3] = uint8_t((plane[bit >> 3] & ~(1u << (bit & 7))) | (((value >> b) & 1u) << (bit & 7)));
  }
}
void set_lsb(uint8_t* record, int64_t head_dim, int64_t i, BitPlanes p, uint32_t value) {
  uint8_t* plane = record + 4 + kernels::bit_plane_bytes(head_dim, p.msb);
  for (int32_t b = 0; b < p.lsb; ++b) {
    const int64_t bit = i * p.lsb + b;
    plane[bit >> 3] = uint8_t((plane[bit >> 3] & ~(1u << (bit & 7))) | (((value >> b) & 1u) << (bit & 7)));
  }
}

// One kv head, two query heads, a decode row over 40 cached keys and its own:
// every key's channel 0 decodes (MSB planes, scale 1) to 7.5 but key 7's to
// 71.5, and the queries read channel 0 only, so the largest MSB probability is
// 1 / (1 + 40 exp(-8 q0)). Head 0's q0 puts it 2% above the threshold, head
// 1's 2% below: head 1 alone is recomputed from both planes. The 40 equal
// keys tie in the MSB pass, and in threes in the full one (their LSBs of
// channel 0 cycle 0, 1, 2): value pruning keeps the earliest of equal keys.
TEST(CudaAttentionBitPlanesCrafted, RowsJustAboveAndJustBelowTheThresholdWithTies) {
  INFERLAB_REQUIRE_GPU();
  const BitPlanes planes{4, 4};
  const float threshold = 0.1f;
  AttentionSpec spec;
  spec.n_rows = 1;
  spec.n_heads = 2;
  spec.n_kv_heads = 1;
  spec.head_dim = 64;
  spec.n_cached = 40;
  spec.stats = true;
  spec.seed = 5;
  PlaneCase c = make_plane_case(spec, planes);
  const float one = 1.0f;
  for (int32_t t = 0; t <= 40; ++t) {
    uint8_t* k = c.key_record(0, t);
    std::memcpy(k, &one, 4);
    set_msb(k, 0, planes, t == 7 ? 12u : 8u);  // (hi * 16 + 7.5 - 128) * scale
    set_lsb(k, 64, 0, planes, uint32_t(t % 3));
  }
  const int32_t n_keys = 41;
  const auto q0_for = [&](float p) { return -std::log((1.0f / p - 1.0f) / float(n_keys - 1)) / (64.0f * 0.125f); };
  std::fill(c.element.q.begin(), c.element.q.end(), 0.0f);
  c.element.q[0] = q0_for(threshold * 1.02f);   // head 0: just above
  c.element.q[64] = q0_for(threshold * 0.98f);  // head 1: just below
  const auto largest = msb_largest(c);
  ASSERT_EQ(largest.size(), 2u);
  EXPECT_NEAR(largest[0], threshold * 1.02f, 1e-4f);
  EXPECT_NEAR(largest[1], threshold * 0.98f, 1e-4f);
  for (double keep : {1.0, 0.25}) {
    const std::string what = fmt::format("keep {}", keep);
    const Launch got = run_device(c, true, threshold, keep, false, 1);
    const TwinResult want = run_twin(c, true, threshold, keep, false);
    EXPECT_EQ(got.requant, want.requant) << what;
    ASSERT_EQ(got.requant.size(), 6u);
    EXPECT_EQ(got.requant[0], 0) << what << ": head 0 above the threshold";
    EXPECT_EQ(got.requant[3], 1) << what << ": head 1 below the threshold";
    EXPECT_EQ(got.requant[4], 40) << what << ": head 1 read the LSB planes of every cached key";
    EXPECT_LT(normalized_error(got.out, want.out), 1e-4) << what;
    EXPECT_LT(normalized_error(got.mass, want.mass), 1e-4) << what;
    EXPECT_EQ(got.kept, want.kept) << what << ": ties go to the earlier key";
    if (keep < 1.0) {
      // Head 0 (MSB planes): key 7, then the earliest ten of the tie.
      std::vector<uint8_t> head0(got.kept.begin(), got.kept.begin() + n_keys);
      std::vector<uint8_t> expected(size_t(n_keys), 0);
      std::fill(expected.begin(), expected.begin() + 11, uint8_t{1});
      EXPECT_EQ(head0, expected) << what;
      EXPECT_EQ(got.requant[5], std::count(got.kept.begin() + 41, got.kept.begin() + 41 + 40, uint8_t{1})) << what;
    } else {
      EXPECT_EQ(got.requant[5], 40) << what << ": every cached value kept";
    }
  }
}

TEST(CudaAttentionBitPlanesArgs, EachKernelRefusesTheOtherPageForm) {
  INFERLAB_REQUIRE_GPU();
  AttentionSpec spec;
  spec.n_heads = 2;
  spec.n_kv_heads = 1;
  spec.head_dim = 64;
  spec.n_cached = 20;
  PlaneCase c = make_plane_case(spec, BitPlanes{4, 4});
  DevicePlanes dev(c);
  const int32_t max_keys = c.element.max_keys();
  const size_t row = kernels::cuda::value_topk_row_scratch_bytes(dev.call, max_keys);
  DeviceBuffer<uint8_t> scratch(row);
  DeviceBuffer<uint8_t> ws(1 << 20);
  EXPECT_EQ(kernels::cuda::attention(dev.call, max_keys, ws.get(), ws.size(), nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(kernels::cuda::attention_value_topk(dev.call, max_keys, 0.5, false, nullptr, scratch.get(), row, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(kernels::cuda::attention_progressive(dev.call, max_keys, true, 0.1f, 1.0, false, nullptr, nullptr,
                                                 scratch.get(), row - 4, nullptr),
            cudaErrorInvalidValue)
      << "scratch below one row";
  kernels::AttentionCall elements = dev.call;
  elements.kv.planes = {};
  EXPECT_EQ(kernels::cuda::attention_progressive(elements, max_keys, true, 0.1f, 1.0, false, nullptr, nullptr,
                                                 scratch.get(), row, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace test_cuda_bit_planes
}  // namespace inferlab::test
