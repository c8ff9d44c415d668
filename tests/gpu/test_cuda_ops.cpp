// The small CUDA kernels (embedding, rmsnorm, rope, activation, KV cache ops,
// sampling, init) against their CPU twins (cpu_ops.h, cpu_twins.h) on random
// inputs. Float ops must agree to a normalized error of 1e-5; ops that store
// f16 / bf16 to 1e-3 / 1e-2; copies, conversions and the random fill bit for bit.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/cpu_twins.h"
#include "cuda/activation.cuh"
#include "cuda/embedding.cuh"
#include "cuda/init.cuh"
#include "cuda/kv_cache_ops.cuh"
#include "cuda/rmsnorm.cuh"
#include "cuda/rope.cuh"
#include "cuda/sampling.cuh"
#include "gpu_kernel_support.h"
#include "gpu_test_support.h"

namespace inferlab::kernels {
namespace test_cuda_ops {

using gpu_test::DeviceBuffer;
using gpu_test::MirrorPool;
using gpu_test::param_name;
using gpu_test::shuffled_ids;
using gpu_test::to_bytes;
using gpu_test::to_floats;
using gpu_test::normalized_error;
using gpu_test::random_floats;

const std::vector<DType> kAllDtypes = {DType::F32, DType::F16, DType::BF16};

double tolerance(DType stored) { return stored == DType::F32 ? 1e-5 : stored == DType::F16 ? 1e-3 : 1e-2; }

std::vector<int32_t> random_ids(size_t n, int32_t bound, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = int32_t(rng() % uint64_t(bound));
  return ids;
}

// ---- embedding ----------------------------------------------------------

struct EmbeddingCase {
  DType dtype;
  int64_t n_embd, n;
  std::string name() const {
    return std::string(dtype_name(dtype)) + "_embd" + std::to_string(n_embd) + "_n" + std::to_string(n);
  }
};

class EmbeddingLookup : public testing::TestWithParam<EmbeddingCase> {};

TEST_P(EmbeddingLookup, MatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const int32_t n_vocab = 1000;
  const auto table = to_bytes(random_floats(size_t(n_vocab * c.n_embd), 1), c.dtype);  // (n_vocab, n_embd)
  const auto ids = random_ids(size_t(c.n), n_vocab, 2);
  DeviceBuffer<uint8_t> d_table(table);
  DeviceBuffer<int32_t> d_ids(ids);
  DeviceBuffer<float> d_out(size_t(c.n * c.n_embd));
  INFERLAB_CUDA_OK(cuda::embedding_lookup(d_table.get(), c.dtype, c.n_embd, d_ids.get(), c.n, d_out.get(), nullptr));
  std::vector<float> expected(d_out.size());
  cpu::embedding_lookup(table.data(), c.dtype, c.n_embd, ids.data(), c.n, expected.data());
  EXPECT_EQ(d_out.download(), expected);
}

INSTANTIATE_TEST_SUITE_P(CudaOps, EmbeddingLookup,
                         testing::Values(EmbeddingCase{DType::F16, 576, 1}, EmbeddingCase{DType::F16, 576, 513},
                                         EmbeddingCase{DType::BF16, 4096, 7}, EmbeddingCase{DType::F32, 577, 7},
                                         EmbeddingCase{DType::BF16, 576, 513}),
                         param_name<EmbeddingCase>);

// ---- rmsnorm ----------------------------------------------------------------

struct RowsCase {
  DType dtype;
  int64_t rows, n;
  std::string name() const {
    return std::string(dtype_name(dtype)) + "_rows" + std::to_string(rows) + "_n" + std::to_string(n);
  }
};

std::vector<RowsCase> rows_cases() {
  std::vector<RowsCase> cases;
  for (DType dtype : kAllDtypes)
    for (int64_t rows : {1, 7, 513})
      for (int64_t n : {576, 4096, 1001}) cases.push_back({dtype, rows, n});
  return cases;
}

class Rmsnorm : public testing::TestWithParam<RowsCase> {};

TEST_P(Rmsnorm, MatchesCpuOps) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const auto x = random_floats(size_t(c.rows * c.n), 3, 2.0f);
  const auto weight = random_floats(size_t(c.n), 4);
  DeviceBuffer<float> d_x(x), d_weight(weight);
  DeviceBuffer<uint8_t> d_out(x.size() * size_t(dtype_bytes(c.dtype)));
  INFERLAB_CUDA_OK(cuda::rmsnorm(d_x.get(), d_weight.get(), c.rows, c.n, 1e-5f, d_out.get(), c.dtype, nullptr));
  std::vector<float> expected(x.size());
  cpu::rmsnorm(expected.data(), x.data(), weight.data(), c.rows, c.n, 1e-5f);
  EXPECT_LT(normalized_error(to_floats(d_out.download(), c.dtype), expected), tolerance(c.dtype));
}

INSTANTIATE_TEST_SUITE_P(CudaOps, Rmsnorm, testing::ValuesIn(rows_cases()), param_name<RowsCase>);

// ---- rope -------------------------------------------------------------------

struct RopeCase {
  bool neox;
  int64_t rows, head_dim, rope_dim;
  int32_t position_groups;
  int32_t max_position;
  std::string name() const {
    return std::string(neox ? "neox" : "normal") + "_rows" + std::to_string(rows) + "_hd" + std::to_string(head_dim) +
           "_rd" + std::to_string(rope_dim) + "_groups" + std::to_string(position_groups) + "_maxpos" +
           std::to_string(max_position);
  }
};

std::vector<RopeCase> rope_cases() {
  std::vector<RopeCase> cases;
  for (bool neox : {false, true})
    for (int64_t rows : {1, 7, 513})
      for (int64_t head_dim : {64, 128}) {
        cases.push_back({neox, rows, head_dim, head_dim, 1, 131071});
        cases.push_back({neox, rows, head_dim, head_dim / 2, 4, 4096});
      }
  return cases;
}

class Rope : public testing::TestWithParam<RopeCase> {};

// Query heads of a packed (rows, q | k | v) projection: row_stride is wider than
// the rotated heads, and the columns past them must stay untouched.
TEST_P(Rope, MatchesCpuRopeStridedPerHead) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const int64_t n_heads = 8, row_stride = (n_heads + 2 * 4) * c.head_dim;
  const float theta = 500000.0f;
  auto x = random_floats(size_t(c.rows * row_stride), 5);
  auto positions = random_ids(size_t(c.rows * c.position_groups), c.max_position + 1, 6);  // (groups, rows)
  positions[0] = c.max_position;
  DeviceBuffer<float> d_x(x);
  DeviceBuffer<int32_t> d_positions(positions);
  INFERLAB_CUDA_OK(cuda::rope(d_x.get(), c.rows, row_stride, n_heads, c.head_dim, c.rope_dim, d_positions.get(),
                              c.position_groups, theta, c.neox, nullptr));
  for (int64_t h = 0; h < n_heads; ++h) {
    const int32_t* head_positions = positions.data() + (h * c.position_groups / n_heads) * c.rows;
    cpu::rope_strided(x.data() + h * c.head_dim, c.rows, row_stride, 1, c.head_dim, c.rope_dim, head_positions, theta,
                      c.neox);
  }
  const auto got = d_x.download();
  EXPECT_LT(normalized_error(got, x), 1e-5);
  float max_diff = 0.0f;
  for (size_t i = 0; i < x.size(); ++i) max_diff = std::max(max_diff, std::fabs(got[i] - x[i]));
  EXPECT_LT(max_diff, 1e-5f) << "elementwise, at positions up to " << c.max_position;
}

INSTANTIATE_TEST_SUITE_P(CudaOps, Rope, testing::ValuesIn(rope_cases()), param_name<RopeCase>);

// ---- activation -------------------------------------------------------------

struct ElementsCase {
  DType dtype;
  int64_t n;
  std::string name() const { return std::string(dtype_name(dtype)) + "_n" + std::to_string(n); }
};

std::vector<ElementsCase> elements_cases() {
  std::vector<ElementsCase> cases;
  for (DType dtype : kAllDtypes)
    for (int64_t n : {1, 1000, 14336 * 7, 1000003}) cases.push_back({dtype, n});
  return cases;
}

class Elementwise : public testing::TestWithParam<ElementsCase> {};

TEST_P(Elementwise, SiluMulMatchesCpuOps) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  auto gate = random_floats(size_t(c.n), 7, 3.0f);
  const auto up = random_floats(size_t(c.n), 8);
  DeviceBuffer<float> d_gate(gate), d_up(up);
  DeviceBuffer<uint8_t> d_out(size_t(c.n) * size_t(dtype_bytes(c.dtype)));
  INFERLAB_CUDA_OK(cuda::silu_mul(d_gate.get(), d_up.get(), c.n, d_out.get(), c.dtype, nullptr));
  cpu::silu_mul(gate.data(), up.data(), 1, c.n);
  EXPECT_LT(normalized_error(to_floats(d_out.download(), c.dtype), gate), tolerance(c.dtype));
}

TEST_P(Elementwise, AddInplaceMatchesCpuOps) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  auto y = random_floats(size_t(c.n), 9);
  const auto x = random_floats(size_t(c.n), 10);
  DeviceBuffer<float> d_y(y), d_x(x);
  INFERLAB_CUDA_OK(cuda::add_inplace(d_y.get(), d_x.get(), c.n, nullptr));
  cpu::add_inplace(y.data(), x.data(), 1, c.n);
  EXPECT_EQ(d_y.download(), y);
}

// Both directions bit for bit: half_convert.h rounds like the CUDA intrinsics.
TEST_P(Elementwise, ConvertIsBitExact) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  auto x = random_floats(size_t(c.n), 11, 100.0f);
  if (c.n > 3) x[0] = 65520.0f, x[1] = 3e-8f, x[2] = -1e-6f;  // overflow and subnormal halves
  DeviceBuffer<float> d_x(x), d_back(x.size());
  DeviceBuffer<uint8_t> d_stored(x.size() * size_t(dtype_bytes(c.dtype)));
  INFERLAB_CUDA_OK(cuda::convert_from_float(d_x.get(), c.n, d_stored.get(), c.dtype, nullptr));
  INFERLAB_CUDA_OK(cuda::convert_to_float(d_stored.get(), c.dtype, c.n, d_back.get(), nullptr));
  const auto expected = to_bytes(x, c.dtype);
  EXPECT_EQ(d_stored.download(), expected);
  EXPECT_EQ(d_back.download(), to_floats(expected, c.dtype));
}

TEST_P(Elementwise, FillRandomNormalIsBitExact) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  for (uint64_t seed : {uint64_t(0), uint64_t(0x5eed5eed5eedull)}) {
    DeviceBuffer<uint8_t> d_out(size_t(c.n) * size_t(dtype_bytes(c.dtype)));
    INFERLAB_CUDA_OK(cuda::fill_random_normal(d_out.get(), c.dtype, c.n, seed, 0.02f, nullptr));
    std::vector<uint8_t> expected(d_out.size());
    cpu::fill_random_normal(expected.data(), c.dtype, c.n, seed, 0.02f);
    EXPECT_EQ(d_out.download(), expected) << "seed " << seed;
  }
}

TEST_P(Elementwise, FillConstant) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  DeviceBuffer<uint8_t> d_out(size_t(c.n) * size_t(dtype_bytes(c.dtype)));
  INFERLAB_CUDA_OK(cuda::fill_constant(d_out.get(), c.dtype, c.n, 1.1f, nullptr));
  EXPECT_EQ(d_out.download(), to_bytes(std::vector<float>(size_t(c.n), 1.1f), c.dtype));
}

INSTANTIATE_TEST_SUITE_P(CudaOps, Elementwise, testing::ValuesIn(elements_cases()), param_name<ElementsCase>);

struct NormsCase {
  int32_t n_rows, n_heads, head_dim;
  std::string name() const {
    return "rows" + std::to_string(n_rows) + "_heads" + std::to_string(n_heads) + "_hd" + std::to_string(head_dim);
  }
};

class HeadOutputNorms : public testing::TestWithParam<NormsCase> {};

TEST_P(HeadOutputNorms, MatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const auto attn = random_floats(size_t(c.n_rows) * c.n_heads * c.head_dim, 12);
  DeviceBuffer<float> d_attn(attn), d_norms(size_t(c.n_heads)), d_l1(size_t(c.n_heads));
  INFERLAB_CUDA_OK(
      cuda::head_output_norms(d_attn.get(), c.n_rows, c.n_heads, c.head_dim, d_norms.get(), d_l1.get(), nullptr));
  std::vector<float> expected(size_t(c.n_heads)), expected_l1(size_t(c.n_heads));
  cpu::head_output_norms(attn.data(), c.n_rows, c.n_heads, c.head_dim, expected.data(), expected_l1.data());
  EXPECT_LT(normalized_error(d_norms.download(), expected), 1e-5);
  EXPECT_LT(normalized_error(d_l1.download(), expected_l1), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(CudaOps, HeadOutputNorms,
                         testing::Values(NormsCase{1, 32, 128}, NormsCase{7, 9, 64}, NormsCase{513, 32, 128},
                                         NormsCase{513, 15, 64}, NormsCase{3, 4, 33}),
                         param_name<NormsCase>);

struct GatherCase {
  DType dtype;
  int64_t row_len, n_rows;
  std::string name() const {
    return std::string(dtype_name(dtype)) + "_len" + std::to_string(row_len) + "_rows" + std::to_string(n_rows);
  }
};

class GatherRows : public testing::TestWithParam<GatherCase> {};

TEST_P(GatherRows, MatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const int32_t n_source_rows = 600;
  const auto w = to_bytes(random_floats(size_t(n_source_rows * c.row_len), 13), c.dtype);
  const auto rows = random_ids(size_t(c.n_rows), n_source_rows, 14);
  DeviceBuffer<uint8_t> d_w(w), d_out(size_t(c.n_rows * c.row_len) * size_t(dtype_bytes(c.dtype)));
  DeviceBuffer<int32_t> d_rows(rows);
  INFERLAB_CUDA_OK(cuda::gather_rows(d_w.get(), c.dtype, c.row_len, d_rows.get(), c.n_rows, d_out.get(), nullptr));
  std::vector<uint8_t> expected(d_out.size());
  cpu::gather_rows(w.data(), c.dtype, c.row_len, rows.data(), c.n_rows, expected.data());
  EXPECT_EQ(d_out.download(), expected);
}

INSTANTIATE_TEST_SUITE_P(CudaOps, GatherRows,
                         testing::Values(GatherCase{DType::F16, 4096, 513}, GatherCase{DType::BF16, 577, 7},
                                         GatherCase{DType::F16, 3, 7}, GatherCase{DType::F32, 576, 1},
                                         GatherCase{DType::BF16, 14336, 7}),
                         param_name<GatherCase>);

// ---- KV cache ---------------------------------------------------------------

struct KvCase {
  DType dtype;
  int32_t page_size, head_dim, n_rows;
  std::string name() const {
    return std::string(dtype_name(dtype)) + "_page" + std::to_string(page_size) + "_hd" + std::to_string(head_dim) +
           "_rows" + std::to_string(n_rows);
  }
};

std::vector<KvCase> kv_cases() {
  std::vector<KvCase> cases;
  for (DType dtype : kAllDtypes)
    for (int32_t page_size : {16, 7})
      for (int32_t head_dim : {64, 128})
        for (int32_t n_rows : {1, 7, 513}) cases.push_back({dtype, page_size, head_dim, n_rows});
  return cases;
}

class KvCache : public testing::TestWithParam<KvCase> {};

TEST_P(KvCache, AppendMatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const int32_t n_kv_heads = 4, stride = (600 + 513) / c.page_size + 1;
  const int32_t n_pages = n_kv_heads * stride;
  MirrorPool pool(c.dtype, n_pages, c.page_size, c.head_dim, 15);
  // Each head's logical pages map to a shuffled set of physical pages.
  const auto pages = shuffled_ids(n_pages, 16);  // (n_kv_heads, stride)
  const std::vector<int32_t> first_token = {0, 5, 600, c.page_size - 1};
  const auto k = random_floats(size_t(c.n_rows) * n_kv_heads * c.head_dim, 17);
  const auto v = random_floats(k.size(), 18);
  DeviceBuffer<int32_t> d_pages(pages), d_first(first_token);
  DeviceBuffer<float> d_k(k), d_v(v);
  INFERLAB_CUDA_OK(cuda::kv_append(pool.device(), {d_pages.get(), stride}, d_first.get(), d_k.get(), d_v.get(),
                                   c.n_rows, n_kv_heads, nullptr));
  cpu::kv_append(pool.host(), {pages.data(), stride}, first_token.data(), k.data(), v.data(), c.n_rows, n_kv_heads);
  pool.expect_bit_equal();
}

// Compaction of one head's 40 * page_size tokens after evicting a random third:
// kept token t moves down to its new index, a chain of overlapping moves; the
// device's rows (any format) must equal the twin's byte for byte.
void expect_compaction_matches_twin(MirrorPool& pool, int32_t n_tokens, int32_t page_size, uint32_t seed) {
  std::vector<int32_t> src_page, src_slot, dst_page, dst_slot;
  std::mt19937 rng(seed);
  int32_t kept = 0;
  for (int32_t t = 0; t < n_tokens; ++t) {
    if (rng() % 3 == 0) continue;
    if (kept != t) {
      src_page.push_back(t / page_size), src_slot.push_back(t % page_size);
      dst_page.push_back(kept / page_size), dst_slot.push_back(kept % page_size);
    }
    ++kept;
  }
  const auto n_moves = int32_t(src_page.size());
  DeviceBuffer<int32_t> d_sp(src_page), d_ss(src_slot), d_dp(dst_page), d_ds(dst_slot);
  EXPECT_EQ(cuda::kv_move_scratch_bytes(pool.device(), n_moves), size_t(n_moves) * 2 * size_t(pool.host().row_bytes()));
  DeviceBuffer<uint8_t> scratch(cuda::kv_move_scratch_bytes(pool.device(), n_moves));
  INFERLAB_CUDA_OK(cuda::kv_move_rows(pool.device(), d_sp.get(), d_ss.get(), d_dp.get(), d_ds.get(), n_moves,
                                      scratch.get(), nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  cpu::kv_move_rows(pool.host(), src_page.data(), src_slot.data(), dst_page.data(), dst_slot.data(), n_moves);
  pool.expect_bit_equal();
}

TEST_P(KvCache, MoveRowsCompactionMatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  MirrorPool pool(c.dtype, 40, c.page_size, c.head_dim, 19);
  expect_compaction_matches_twin(pool, 40 * c.page_size, c.page_size, uint32_t(c.n_rows));
}

// n_rows keys at random (page, slot), shifted by deltas up to +-131071.
TEST_P(KvCache, RopeShiftMatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const int32_t n_pages = 600;
  for (bool neox : {false, true}) {
    MirrorPool pool(c.dtype, n_pages, c.page_size, c.head_dim, 20);
    // Distinct (page, slot): a row shifted twice would depend on the order.
    const auto all = shuffled_ids(n_pages * c.page_size, 21);
    std::vector<int32_t> page, slot, delta = random_ids(size_t(c.n_rows), 2 * 131071 + 1, 22);
    for (int32_t j = 0; j < c.n_rows; ++j) {
      page.push_back(all[size_t(j)] / c.page_size), slot.push_back(all[size_t(j)] % c.page_size);
      delta[size_t(j)] -= 131071;
    }
    DeviceBuffer<int32_t> d_page(page), d_slot(slot), d_delta(delta);
    INFERLAB_CUDA_OK(cuda::kv_rope_shift(pool.device(), d_page.get(), d_slot.get(), d_delta.get(), c.n_rows,
                                         c.head_dim, 10000.0f, neox, nullptr));
    cpu::kv_rope_shift(pool.host(), page.data(), slot.data(), delta.data(), c.n_rows, c.head_dim, 10000.0f, neox);
    // Same angles; the sine/cosine may differ in the last float bit, so a stored
    // f16/bf16 value may round one ulp apart.
    EXPECT_LT(normalized_error(pool.key_rows(true, page, slot), pool.key_rows(false, page, slot)), tolerance(c.dtype))
        << (neox ? "neox" : "normal");
  }
}

TEST_P(KvCache, CopyPagesMatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const int32_t n_pages = 2 * c.n_rows + 3;
  MirrorPool pool(c.dtype, n_pages, c.page_size, c.head_dim, 23);
  const auto all = shuffled_ids(n_pages, 24);
  const std::vector<int32_t> src(all.begin(), all.begin() + c.n_rows), dst(all.begin() + c.n_rows, all.begin() + 2 * c.n_rows);
  DeviceBuffer<int32_t> d_src(src), d_dst(dst);
  INFERLAB_CUDA_OK(cuda::kv_copy_pages(pool.device(), d_src.get(), d_dst.get(), c.n_rows, nullptr));
  cpu::kv_copy_pages(pool.host(), src.data(), dst.data(), c.n_rows);
  pool.expect_bit_equal();
}

INSTANTIATE_TEST_SUITE_P(CudaOps, KvCache, testing::ValuesIn(kv_cases()), param_name<KvCase>);

// ---- KV cache of bit-plane records ----------------------------------------------

struct PlaneKvCase {
  BitPlanes planes;
  int32_t page_size, head_dim, n_rows;
  std::string name() const {
    return "planes" + std::to_string(planes.msb) + "_" + std::to_string(planes.lsb) + "_page" +
           std::to_string(page_size) + "_hd" + std::to_string(head_dim) + "_rows" + std::to_string(n_rows);
  }
};

std::vector<PlaneKvCase> plane_kv_cases() {
  std::vector<PlaneKvCase> cases;
  // Records of 4 + 8 * bits (hd 64) or 4 + 16 * bits bytes, and a plane whose values straddle bytes (3, 5, 7 bits).
  for (BitPlanes planes : {BitPlanes{4, 4}, BitPlanes{6, 4}, BitPlanes{3, 5}, BitPlanes{8, 0}, BitPlanes{1, 1},
                           BitPlanes{8, 8}, BitPlanes{7, 2}})
    for (int32_t page_size : {16, 7})
      for (int32_t head_dim : {64, 128}) cases.push_back({planes, page_size, head_dim, 37});
  cases.push_back({BitPlanes{6, 4}, 16, 128, 513});
  cases.push_back({BitPlanes{5, 3}, 7, 64, 1});
  return cases;
}

class KvCacheBitPlanes : public testing::TestWithParam<PlaneKvCase> {};

// Rows the encoder must round exactly as the host does: random ones, and
// a zero row, a row of denormals (its scale's reciprocal overflows), rows
// with a NaN and with an infinity, a row whose values sit on the grid's
// half steps (ties to even), and a row whose largest magnitude is negative.
std::vector<float> encoder_rows(int32_t rows, int32_t head_dim, BitPlanes planes, uint64_t seed) {
  std::vector<float> x = random_floats(size_t(rows) * size_t(head_dim), seed, 2.0f);
  const int32_t qmax = (1 << (planes.bits() - 1)) - 1;
  for (int32_t r = 0; r < rows; ++r) {
    float* row = x.data() + int64_t(r) * head_dim;
    switch (r % 8) {
      case 1: std::fill(row, row + head_dim, 0.0f); break;
      case 2:
        for (int32_t d = 0; d < head_dim; ++d) row[d] = float(d % 5 - 2) * 1e-41f;
        break;
      case 3: row[r % head_dim] = std::numeric_limits<float>::quiet_NaN(); break;
      case 4: row[(r + 3) % head_dim] = -std::numeric_limits<float>::infinity(); break;
      case 5:  // scale 1 (the largest magnitude is qmax): each k + 0.5 rounds to the even neighbour
        for (int32_t d = 0; d < head_dim; ++d) row[d] = float(d % (2 * qmax) - qmax) + 0.5f;
        row[0] = float(qmax);
        break;
      case 6: row[head_dim / 2] = -40.0f; break;
      default: break;
    }
  }
  return x;
}

TEST_P(KvCacheBitPlanes, AppendEncodesLikeTheHostByteForByte) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const int32_t n_kv_heads = 4, stride = (600 + c.n_rows) / c.page_size + 1;
  const int32_t n_pages = n_kv_heads * stride;
  MirrorPool pool(c.planes, n_pages, c.page_size, c.head_dim, 15);
  const auto pages = shuffled_ids(n_pages, 16);  // (n_kv_heads, stride)
  const std::vector<int32_t> first_token = {0, 5, 600, c.page_size - 1};
  const auto k = encoder_rows(c.n_rows * n_kv_heads, c.head_dim, c.planes, 17);
  const auto v = encoder_rows(c.n_rows * n_kv_heads, c.head_dim, c.planes, 18);
  DeviceBuffer<int32_t> d_pages(pages), d_first(first_token);
  DeviceBuffer<float> d_k(k), d_v(v);
  INFERLAB_CUDA_OK(cuda::kv_append(pool.device(), {d_pages.get(), stride}, d_first.get(), d_k.get(), d_v.get(),
                                   c.n_rows, n_kv_heads, nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  // The twin writes cpu::bit_plane_encode's records.
  cpu::kv_append(pool.host(), {pages.data(), stride}, first_token.data(), k.data(), v.data(), c.n_rows, n_kv_heads);
  pool.expect_bit_equal();
}

TEST_P(KvCacheBitPlanes, MoveRowsCompactionMatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  MirrorPool pool(c.planes, 40, c.page_size, c.head_dim, 19);
  expect_compaction_matches_twin(pool, 40 * c.page_size, c.page_size, uint32_t(c.n_rows));
}

TEST_P(KvCacheBitPlanes, CopyPagesMatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const int32_t n_pages = 2 * c.n_rows + 3;
  MirrorPool pool(c.planes, n_pages, c.page_size, c.head_dim, 23);
  const auto all = shuffled_ids(n_pages, 24);
  const std::vector<int32_t> src(all.begin(), all.begin() + c.n_rows), dst(all.begin() + c.n_rows, all.begin() + 2 * c.n_rows);
  DeviceBuffer<int32_t> d_src(src), d_dst(dst);
  INFERLAB_CUDA_OK(cuda::kv_copy_pages(pool.device(), d_src.get(), d_dst.get(), c.n_rows, nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  cpu::kv_copy_pages(pool.host(), src.data(), dst.data(), c.n_rows);
  pool.expect_bit_equal();
}

INSTANTIATE_TEST_SUITE_P(CudaOps, KvCacheBitPlanes, testing::ValuesIn(plane_kv_cases()), param_name<PlaneKvCase>);

// Bit-plane pages take no RoPE turn and no element-wise kernel, and pages of
// one layout do not copy into another.
TEST(CudaOpsArguments, BitPlanePagesAreRefusedWhereElementsAreRead) {
  INFERLAB_REQUIRE_GPU();
  MirrorPool planes(BitPlanes{4, 4}, 4, 16, 64, 3);
  MirrorPool halves(DType::F16, 4, 16, 64, 3);
  DeviceBuffer<int32_t> ids(std::vector<int32_t>{0, 1, 2, 3});
  EXPECT_EQ(cuda::kv_rope_shift(planes.device(), ids.get(), ids.get(), ids.get(), 1, 64, 1e4f, false, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::kv_rope_from_originals(planes.device(), ids.get(), ids.get(), ids.get(), ids.get(), ids.get(), 1, 64,
                                         1e4f, false, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::kv_copy_pages(planes.device(), halves.device(), ids.get(), ids.get() + 1, 1, nullptr),
            cudaErrorInvalidValue);
  KvPages bad = planes.device();
  bad.planes = BitPlanes{9, 0};  // wider than the codec's planes
  EXPECT_EQ(cuda::kv_copy_pages(bad, ids.get(), ids.get() + 1, 1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// ---- sampling ---------------------------------------------------------------

struct VocabCase {
  int64_t rows, n;
  std::string name() const { return "rows" + std::to_string(rows) + "_n" + std::to_string(n); }
};

class Sampling : public testing::TestWithParam<VocabCase> {};

// Logits rounded to a coarse grid, so ties are common: the first index must win.
TEST_P(Sampling, ArgmaxRowsMatchesCpuOps) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  auto logits = random_floats(size_t(c.rows * c.n), 25, 3.0f);
  for (float& x : logits) x = std::round(x * 4.0f) / 4.0f;
  DeviceBuffer<float> d_logits(logits);
  DeviceBuffer<int32_t> d_out(size_t(c.rows));
  INFERLAB_CUDA_OK(cuda::argmax_rows(d_logits.get(), c.rows, c.n, d_out.get(), nullptr));
  std::vector<int32_t> expected;
  for (int64_t r = 0; r < c.rows; ++r) expected.push_back(int32_t(cpu::argmax(logits.data() + r * c.n, c.n)));
  EXPECT_EQ(d_out.download(), expected);
}

// The GPU sums in float and in a different order than the twin's double: a pick
// may differ only where (top_p, uniform) sits within 1e-4 of a boundary.
TEST_P(Sampling, SampleTopPMatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  const auto& c = GetParam();
  const auto logits = random_floats(size_t(c.n), 26 + uint64_t(c.rows), 2.5f);
  DeviceBuffer<float> d_logits(logits);
  DeviceBuffer<uint8_t> workspace(cuda::sample_workspace_bytes(c.n));
  DeviceBuffer<int32_t> d_out(1);
  int exact = 0, total = 0;
  for (float temperature : {0.0f, 0.7f, 1.0f})
    for (float top_p : {0.0f, 0.5f, 0.9f, 1.0f})
      for (float uniform : {0.0f, 0.1f, 0.5f, 0.77f, 0.999f}) {
        INFERLAB_CUDA_OK(cuda::sample_top_p(d_logits.get(), c.n, temperature, top_p, uniform, d_out.get(),
                                            workspace.get(), workspace.size(), nullptr));
        const int32_t got = d_out.download()[0];
        const int32_t expected = cpu::sample_top_p(logits.data(), c.n, temperature, top_p, uniform);
        ++total;
        if (got == expected) {
          ++exact;
          continue;
        }
        std::set<int32_t> nearby;
        for (float dp : {-1e-4f, 0.0f, 1e-4f})
          for (float du : {-1e-4f, 0.0f, 1e-4f})
            nearby.insert(cpu::sample_top_p(logits.data(), c.n, temperature, top_p + dp,
                                            std::clamp(uniform + du, 0.0f, 0.9999f)));
        EXPECT_TRUE(nearby.count(got)) << "T=" << temperature << " top_p=" << top_p << " u=" << uniform << " got "
                                       << got << " expected " << expected;
      }
  EXPECT_GE(exact, total - 2);
}

// NaN logits (a broken method's output) rank last, as -infinity, and the
// sample stays among the real tokens; -0 and +0 tie (lower id first).
TEST(CudaOpsSampling, NanLogitsRankLast) {
  INFERLAB_REQUIRE_GPU();
  auto logits = random_floats(1000, 31, 2.0f);
  for (size_t i = 0; i < logits.size(); i += 7) logits[i] = std::numeric_limits<float>::quiet_NaN();
  logits[3] = -0.0f;
  logits[4] = 0.0f;
  DeviceBuffer<float> d_logits(logits);
  DeviceBuffer<uint8_t> workspace(cuda::sample_workspace_bytes(int64_t(logits.size())));
  DeviceBuffer<int32_t> d_out(1);
  for (float temperature : {0.0f, 1.0f})
    for (float uniform : {0.0f, 0.5f, 0.999f}) {
      INFERLAB_CUDA_OK(cuda::sample_top_p(d_logits.get(), int64_t(logits.size()), temperature, 1.0f, uniform,
                                          d_out.get(), workspace.get(), workspace.size(), nullptr));
      const int32_t got = d_out.download()[0];
      EXPECT_FALSE(std::isnan(logits[size_t(got)])) << "T=" << temperature << " u=" << uniform;
      EXPECT_EQ(got, cpu::sample_top_p(logits.data(), int64_t(logits.size()), temperature, 1.0f, uniform));
    }
}

INSTANTIATE_TEST_SUITE_P(CudaOps, Sampling,
                         testing::Values(VocabCase{1, 49152}, VocabCase{7, 32000}, VocabCase{1, 128256},
                                         VocabCase{513, 1001}),
                         param_name<VocabCase>);

// ---- argument checks --------------------------------------------------------

TEST(CudaOpsArguments, LaunchersRejectBadSizes) {
  INFERLAB_REQUIRE_GPU();
  DeviceBuffer<float> buffer(64);
  DeviceBuffer<int32_t> ids(4);
  EXPECT_EQ(cuda::rope(buffer.get(), 1, 64, 1, 64, 63, ids.get(), 1, 1e4f, false, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::rope(buffer.get(), 1, 32, 1, 64, 64, ids.get(), 1, 1e4f, false, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::rope(buffer.get(), 1, 64, 2, 32, 32, ids.get(), 3, 1e4f, false, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::rmsnorm(buffer.get(), buffer.get(), 1, 64, 1e-5f, buffer.get(), DType(7), nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::silu_mul(buffer.get(), buffer.get(), -1, buffer.get(), DType::F32, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::sample_top_p(buffer.get(), 64, 1.0f, 0.9f, 0.5f, ids.get(), buffer.get(), 16, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::sample_top_p(buffer.get(), 16, 1.0f, 0.9f, 1.0f, ids.get(), buffer.get(), 1 << 20, nullptr),
            cudaErrorInvalidValue);
  const KvPages no_pages{};
  EXPECT_EQ(cuda::kv_copy_pages(no_pages, ids.get(), ids.get(), 1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace test_cuda_ops
}  // namespace inferlab::kernels
