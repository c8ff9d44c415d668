// CUDA attention (kernels/cuda/attention.cuh) against its CPU twin on the same
// random paged inputs (tests/unit/attention_case.h): decode and prefill
// kernels, every KeySelect mode, GQA ratios, block-sparse heads, head masks,
// statistics, page boundaries, odd lengths, a long context and CUDA-graph replay.
// Tolerances: normalized error 2e-3 (f16), 1e-2 (bf16): Q and P are rounded to
// the KV type for the tensor cores.
#include <cmath>

#include "attention_case.h"
#include "cpu/attention_twin.h"
#include "cpu/cpu_ops.h"
#include "cuda/attention.cuh"
#include "cuda/value_topk.cuh"
#include "gpu_test_support.h"

namespace inferlab::test {
namespace test_cuda_attention {

using gpu_test::DeviceBuffer;
using gpu_test::normalized_error;
using kernels::DType;
using Select = AttentionSpec::Select;

std::vector<DeviceBuffer<uint32_t>> upload_chunks(const AttentionCase& c) {
  std::vector<DeviceBuffer<uint32_t>> chunks;
  for (const auto& chunk : c.chunks) chunks.emplace_back(chunk);
  return chunks;
}

std::vector<void*> chunk_pointers(const std::vector<DeviceBuffer<uint32_t>>& chunks) {
  std::vector<void*> out;
  for (const auto& chunk : chunks) out.push_back(chunk.get());
  return out;
}

// Device copies of a case's buffers and the call that points at them.
struct DeviceCase {
  std::vector<DeviceBuffer<uint32_t>> chunks;
  DeviceBuffer<void*> chunk_base;
  DeviceBuffer<int32_t> table, n_cached, select_indptr, select_index;
  DeviceBuffer<int32_t> range_begin, range_end, ranges, column_begin, column_end, columns;
  DeviceBuffer<kernels::SparseHead> sparse_heads;
  DeviceBuffer<uint8_t> select, head_active;
  DeviceBuffer<uint32_t> select_heads;
  DeviceBuffer<float> q, out, key_mass;
  kernels::AttentionCall call;

  explicit DeviceCase(AttentionCase& c)
      : chunks(upload_chunks(c)),
        chunk_base(chunk_pointers(chunks)),
        table(c.table),
        n_cached(c.n_cached),
        select_indptr(c.select_indptr),
        select_index(c.select_index),
        range_begin(c.range_begin),
        range_end(c.range_end),
        ranges(c.ranges),
        column_begin(c.column_begin),
        column_end(c.column_end),
        columns(c.columns),
        sparse_heads(c.sparse_heads),
        select(c.select),
        head_active(c.head_active),
        select_heads(c.select_heads),
        q(c.q),
        out(c.out),  // NaN: every element must be written
        key_mass(c.key_mass),
        call(c.call()) {
    call.q = q.get();
    call.out = out.get();
    call.n_cached = n_cached.get();
    call.kv.chunk_base = chunk_base.get();
    call.table.pages = table.get();
    call.select = c.select.empty() ? nullptr : select.get();
    call.select_indptr = c.select.empty() ? nullptr : select_indptr.get();
    call.select_index = c.select.empty() || c.select_index.empty() ? nullptr : select_index.get();
    call.select_heads = c.select_heads.empty() ? nullptr : select_heads.get();
    call.head_active = c.head_active.empty() ? nullptr : head_active.get();
    if (!c.sparse_heads.empty())
      call.sparse = {sparse_heads.get(), range_begin.get(), range_end.get(), ranges.get(),
                     column_begin.get(),  column_end.get(), columns.get()};
    call.key_mass = c.key_mass.empty() ? nullptr : key_mass.get();
  }
};

double tolerance(DType t) { return t == DType::BF16 ? 1e-2 : 2e-3; }

bool all_finite(const std::vector<float>& x) {
  for (float v : x)
    if (!std::isfinite(v)) return false;
  return true;
}

// The GPU output and key mass match the twin's.
void expect_matches_twin(AttentionCase& host, DeviceCase& dev, const std::string& what) {
  kernels::cpu::attention_twin(host.call());
  const auto out = dev.out.download();
  EXPECT_TRUE(all_finite(out)) << what << ": unwritten or NaN output";
  EXPECT_LT(normalized_error(out, host.out), tolerance(host.spec.dtype)) << what;
  if (host.key_mass.empty()) return;
  const auto mass = dev.key_mass.download();
  EXPECT_LT(normalized_error(mass, host.key_mass), tolerance(host.spec.dtype)) << what << " key_mass";
  double gpu_total = 0, twin_total = 0;
  for (size_t i = 0; i < mass.size(); ++i) gpu_total += mass[i], twin_total += host.key_mass[i];
  EXPECT_NEAR(gpu_total, twin_total, 1e-3 * std::max(1.0, twin_total)) << what << " total mass";
}

void run_and_compare(const AttentionSpec& spec) {
  AttentionCase host = make_attention_case(spec);
  DeviceCase dev(host);
  const size_t ws_bytes = kernels::cuda::attention_workspace_bytes(dev.call, host.max_keys());
  DeviceBuffer<uint8_t> ws(ws_bytes);
  INFERLAB_CUDA_OK(kernels::cuda::attention(dev.call, host.max_keys(), ws.get(), ws_bytes, nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  expect_matches_twin(host, dev, spec.name());
}

AttentionSpec shape(int32_t heads, int32_t kv_heads, int32_t head_dim, int32_t rows, int32_t cached, DType dtype) {
  AttentionSpec s;
  s.n_heads = heads;
  s.n_kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.n_rows = rows;
  s.n_cached = cached;
  s.dtype = dtype;
  return s;
}

// Decode (n_rows 1): odd key counts, GQA 4 (Llama), 3 (SmolLM2), 1.
std::vector<AttentionSpec> decode_specs() {
  std::vector<AttentionSpec> specs;
  uint64_t seed = 1;
  const std::tuple<int32_t, int32_t, int32_t> heads[] = {{32, 8, 128}, {9, 3, 64}, {4, 4, 128}};
  for (auto [h, kv, hd] : heads)
    for (int32_t keys : {1, 17, 255, 1000, 4097})
      for (DType dt : {DType::F16, DType::BF16}) {
        AttentionSpec s = shape(h, kv, hd, 1, keys - 1, dt);
        s.stats = keys % 2 == 1;
        s.seed = seed++;
        specs.push_back(s);
      }
  return specs;
}

// Decode with selections, masks, page sizes, per-head cached counts and several rows.
std::vector<AttentionSpec> decode_select_specs() {
  std::vector<AttentionSpec> specs;
  uint64_t seed = 100;
  for (Select sel : {Select::All, Select::Pages, Select::Tokens, Select::Mixed})
    for (int32_t ps : {16, 5}) {
      AttentionSpec s = shape(32, 8, 128, 1, 1000, DType::F16);
      s.select = sel;
      s.page_size = ps;
      s.cached_step = 7;
      s.stats = true;
      s.head_mask = ps == 5;
      s.seed = seed++;
      specs.push_back(s);
    }
  for (auto [h, kv, rows] : {std::tuple{32, 8, 4}, std::tuple{9, 3, 3}, std::tuple{8, 8, 8}, std::tuple{9, 3, 6}}) {
    AttentionSpec s = shape(h, kv, 64, rows, 777, DType::BF16);  // 6 rows x group 3 > 16 queries: prefill kernel
    s.select = Select::Mixed;
    s.stats = true;
    s.head_mask = true;
    s.seed = seed++;
    specs.push_back(s);
  }
  return specs;
}

// Each query head its own part of the selection (select_heads, Quest per
// query head): the decode kernel (GQA 4, 3, 1) and the prefill kernel (6 rows
// x group 3), with statistics and masks.
std::vector<AttentionSpec> head_select_specs() {
  std::vector<AttentionSpec> specs;
  uint64_t seed = 150;
  for (Select sel : {Select::Pages, Select::Tokens, Select::Mixed})
    for (auto [h, kv, rows, ps] : {std::tuple{32, 8, 1, 16}, std::tuple{9, 3, 1, 5}, std::tuple{4, 4, 1, 16},
                                   std::tuple{9, 3, 6, 16}}) {
      AttentionSpec s = shape(h, kv, h == 32 ? 128 : 64, rows, 1000, seed % 2 == 0 ? DType::F16 : DType::BF16);
      s.select = sel;
      s.head_selects = true;
      s.page_size = ps;
      s.cached_step = 7;
      s.stats = true;
      s.head_mask = rows == 6;
      s.seed = seed++;
      specs.push_back(s);
    }
  AttentionSpec s = shape(8, 2, 128, 100, 500, DType::F16);  // prefill rows over a per-head selection
  s.select = Select::Pages;
  s.head_selects = true;
  s.seed = seed++;
  specs.push_back(s);
  return specs;
}

// Prefill: with and without cached tokens, odd lengths across tiles and pages.
std::vector<AttentionSpec> prefill_specs() {
  std::vector<AttentionSpec> specs;
  uint64_t seed = 200;
  const std::tuple<int32_t, int32_t, int32_t> heads[] = {{8, 2, 128}, {9, 3, 64}, {4, 4, 64}};
  for (auto [h, kv, hd] : heads)
    for (int32_t rows : {9, 17, 255, 600})
      for (int32_t cached : {0, 1000}) {
        AttentionSpec s = shape(h, kv, hd, rows, cached, seed % 2 == 0 ? DType::F16 : DType::BF16);
        s.page_size = rows == 255 ? 5 : 16;
        s.stats = rows != 600;
        s.head_mask = rows == 17;
        s.seed = seed++;
        specs.push_back(s);
      }
  return specs;
}

// Prefill kernel with selections, and sparse heads: ranges at any offset and
// columns, several query blocks per CTA (incl. rows that see nothing).
std::vector<AttentionSpec> prefill_sparse_specs() {
  std::vector<AttentionSpec> specs;
  uint64_t seed = 300;
  for (Select sel : {Select::Pages, Select::Tokens, Select::Mixed}) {
    AttentionSpec s = shape(8, 2, 128, 100, 500, DType::F16);
    s.select = sel;
    s.stats = true;
    s.seed = seed++;
    specs.push_back(s);
  }
  for (int32_t bs : {64, 16, 5, 1})
    for (auto [rows, cached] : {std::pair{300, 0}, std::pair{130, 700}, std::pair{1, 900}}) {
      AttentionSpec s = shape(6, 2, bs == 16 ? 64 : 128, rows, cached, bs == 5 ? DType::BF16 : DType::F16);
      s.block_sparse = true;
      s.block_size = bs;
      s.block_density = bs == 1 ? 0.05 : 0.4;
      s.stats = true;
      s.head_mask = bs == 64;
      s.seed = seed++;
      specs.push_back(s);
    }
  return specs;
}

class CudaAttention : public testing::TestWithParam<AttentionSpec> {};

TEST_P(CudaAttention, MatchesTwin) {
  INFERLAB_REQUIRE_GPU();
  run_and_compare(GetParam());
}

const auto spec_name = [](const testing::TestParamInfo<AttentionSpec>& info) { return info.param.name(); };
INSTANTIATE_TEST_SUITE_P(Decode, CudaAttention, testing::ValuesIn(decode_specs()), spec_name);
INSTANTIATE_TEST_SUITE_P(DecodeSelect, CudaAttention, testing::ValuesIn(decode_select_specs()), spec_name);
INSTANTIATE_TEST_SUITE_P(HeadSelect, CudaAttention, testing::ValuesIn(head_select_specs()), spec_name);
INSTANTIATE_TEST_SUITE_P(Prefill, CudaAttention, testing::ValuesIn(prefill_specs()), spec_name);
INSTANTIATE_TEST_SUITE_P(PrefillSparse, CudaAttention, testing::ValuesIn(prefill_sparse_specs()), spec_name);

TEST(CudaAttentionLong, Prefill16kRowsOneHead) {
  INFERLAB_REQUIRE_GPU();
  AttentionSpec s = shape(1, 1, 128, 16384, 0, DType::F16);
  s.stats = true;
  run_and_compare(s);
}

TEST(CudaAttentionLong, Decode128kKeysGqa4) {
  INFERLAB_REQUIRE_GPU();
  AttentionSpec s = shape(8, 2, 128, 1, 131071, DType::BF16);
  s.stats = true;
  run_and_compare(s);
}

TEST(CudaAttentionLong, Prefill1kRowsAfter100kCached) {
  INFERLAB_REQUIRE_GPU();
  run_and_compare(shape(2, 1, 128, 1024, 100000, DType::F16));
}

// A decode call captured once in a CUDA graph, replayed after n_cached changed
// in device memory: the replay reads the new counts.
TEST(CudaAttentionGraph, DecodeReplayReadsNewCounts) {
  INFERLAB_REQUIRE_GPU();
  AttentionSpec s = shape(32, 8, 128, 1, 3000, DType::F16);
  s.select = Select::Mixed;
  s.stats = true;
  AttentionCase host = make_attention_case(s);
  DeviceCase dev(host);
  const int32_t max_keys = host.max_keys();
  const size_t ws_bytes = kernels::cuda::attention_workspace_bytes(dev.call, max_keys);
  DeviceBuffer<uint8_t> ws(ws_bytes);
  cudaStream_t stream;
  INFERLAB_CUDA_OK(cudaStreamCreate(&stream));
  INFERLAB_CUDA_OK(kernels::cuda::attention(dev.call, max_keys, ws.get(), ws_bytes, stream));  // configures kernels
  INFERLAB_CUDA_OK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  INFERLAB_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  INFERLAB_CUDA_OK(kernels::cuda::attention(dev.call, max_keys, ws.get(), ws_bytes, stream));
  INFERLAB_CUDA_OK(cudaStreamEndCapture(stream, &graph));
  INFERLAB_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int32_t& n : host.n_cached) n -= 1234;  // the new token now sits at stored index n_cached
  dev.n_cached.upload(host.n_cached);
  dev.key_mass.upload(host.key_mass);
  INFERLAB_CUDA_OK(cudaGraphLaunch(exec, stream));
  INFERLAB_CUDA_OK(cudaStreamSynchronize(stream));
  expect_matches_twin(host, dev, "graph replay");
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST(CudaAttentionArgs, RejectsF32AndOtherHeadDims) {
  INFERLAB_REQUIRE_GPU();
  AttentionSpec s = shape(2, 1, 64, 3, 5, DType::F32);
  AttentionCase host = make_attention_case(s);
  DeviceCase dev(host);
  EXPECT_EQ(kernels::cuda::attention(dev.call, host.max_keys(), nullptr, 0, nullptr), cudaErrorInvalidValue);
  s = shape(2, 1, 96, 3, 5, DType::F16);
  AttentionCase host96 = make_attention_case(s);
  DeviceCase dev96(host96);
  EXPECT_EQ(kernels::cuda::attention(dev96.call, host96.max_keys(), nullptr, 0, nullptr), cudaErrorInvalidValue);
}

// Local value pruning (SpAtten) against its twin, row by row: GQA, head masks,
// causal rows, f16 and bf16, with and without renormalization; the key mass of
// every key (the full softmax) added as the attention kernels add it.
TEST(CudaValueTopk, MatchesTheTwinRowByRow) {
  INFERLAB_REQUIRE_GPU();
  for (DType dtype : {DType::F16, DType::BF16})
    for (int32_t rows : {1, 3})
      for (bool renormalize : {false, true}) {
        AttentionSpec spec;
        spec.n_rows = rows;
        spec.n_heads = 8;
        spec.n_kv_heads = 2;
        spec.head_dim = 64;
        spec.n_cached = 300;
        spec.cached_step = 7;
        spec.dtype = dtype;
        spec.head_mask = true;
        spec.stats = true;
        spec.seed = uint64_t(11 + rows);
        AttentionCase host = make_attention_case(spec);
        DeviceCase dev(host);
        const int32_t max_keys = host.max_keys();
        DeviceBuffer<uint8_t> scratch(kernels::cuda::value_topk_scratch_bytes(dev.call, max_keys));
        INFERLAB_CUDA_OK(kernels::cuda::attention_value_topk(dev.call, max_keys, 0.3, renormalize, nullptr,
                                                             scratch.get(), scratch.size(), nullptr));
        INFERLAB_CUDA_OK(cudaDeviceSynchronize());
        const auto out = dev.out.download();
        std::vector<float> want(out.size(), 0.0f), probs(static_cast<size_t>(max_keys));
        std::vector<float> mass(host.key_mass.size(), 0.0f);
        const int32_t hd = spec.head_dim, gs = spec.n_heads / spec.n_kv_heads;
        for (int32_t h = 0; h < spec.n_heads; ++h) {
          if (!host.head_active.empty() && host.head_active[size_t(h)] == 0) continue;  // zeros
          const int32_t g = h / gs, stored = host.n_cached[size_t(g)] + rows;
          const float* k = host.k.data() + int64_t(g) * host.max_stored * hd;
          const float* v = host.v.data() + int64_t(g) * host.max_stored * hd;
          const kernels::cpu::KvPageRef page{k, v, stored, DType::F32};
          for (int32_t r = 0; r < rows; ++r) {
            const int64_t visible = host.n_cached[size_t(g)] + r + 1;
            const int64_t at = (int64_t(r) * spec.n_heads + h) * hd;
            kernels::cpu::attention_row_value_topk(host.q.data() + at, &page, 1, visible, hd,
                                                   1.0f / std::sqrt(float(hd)), 0.3, renormalize, want.data() + at,
                                                   probs.data(), nullptr);
            for (int64_t t = 0; t < visible; ++t) mass[size_t(int64_t(g) * host.mass_stride + t)] += probs[size_t(t)];
          }
        }
        const std::string what = fmt::format("{} rows {} renormalize {}", kernels::dtype_name(dtype), rows, renormalize);
        EXPECT_TRUE(all_finite(out)) << what;
        EXPECT_LT(normalized_error(out, want), tolerance(dtype)) << what;
        EXPECT_LT(normalized_error(dev.key_mass.download(), mass), tolerance(dtype)) << what << " key_mass";
      }
}

}  // namespace test_cuda_attention
}  // namespace inferlab::test
