// Hugging Face checkpoints on the CUDA backend: Qwen2's Q/K/V biases and the
// sharded Llama's O bias (Backend::add_bias, kernels::cuda::add_row_bias), and
// Mistral's sliding window past its 64 keys (key plans in Tokens mode, a token
// per call) and Llama 3.1's RoPE scaling (make_rope_freqs), against the CPU backend on the same tiny checkpoints
// (tests/reference/hf_models, the CPU side checked against transformers in
// test_hf_checkpoint.cpp), within f16 rounding; decode steps with graphs
// equal to eager ones.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "cuda/activation.cuh"
#include "gpu_engine_support.h"
#include "gpu_test_support.h"

namespace inferlab {
namespace test_cuda_hf_checkpoint {

namespace fs = std::filesystem;
// The fixtures: from the repository root (the GPU host runs the bundle there),
// else beside this source file.
fs::path reference_dir() {
  for (const fs::path& p : {fs::path("tests/reference"), fs::path(__FILE__).parent_path() / "../reference"})
    if (fs::exists(p / "hf_models_logits.json")) return p;
  return {};
}

std::vector<int32_t> prompt(const std::string& model, size_t index) {
  std::ifstream in(reference_dir() / "hf_models_logits.json");
  const auto j = nlohmann::json::parse(in);
  return j[model][index]["ids"].get<std::vector<int32_t>>();
}

// Every row's logits of the prompt, then of decode steps fed `forced` (the
// CPU's greedy tokens, so that a near-tie cannot send the backends apart).
std::vector<std::vector<float>> all_logits(Engine& engine, const std::vector<int32_t>& ids,
                                           const std::vector<int32_t>& forced) {
  std::vector<std::vector<float>> rows;
  auto seq = engine.new_sequence();
  auto keep = [&](int64_t, std::span<const float> l) { rows.emplace_back(l.begin(), l.end()); };
  auto s = engine.forward(*seq, ids, 0, keep);
  EXPECT_TRUE(s.ok()) << s.message();
  for (size_t i = 0; i < forced.size() && s.ok(); ++i) {
    s = engine.forward(*seq, std::span(&forced[i], 1), 0, keep);
    EXPECT_TRUE(s.ok()) << s.message();
  }
  return rows;
}

std::vector<int32_t> greedy(Engine& engine, const std::vector<int32_t>& ids, int steps) {
  auto seq = engine.new_sequence();
  auto last = engine.prefill(*seq, ids);
  std::vector<int32_t> out;
  for (int i = 0; i < steps && last.ok(); ++i) {
    out.push_back(int32_t(std::max_element(last->begin(), last->end()) - last->begin()));
    last = engine.decode(*seq, out.back());
  }
  EXPECT_TRUE(last.ok()) << last.message();
  return out;
}

TEST(CudaHfCheckpoint, TheRowBiasKernelAddsTheBiasToEveryRow) {
  INFERLAB_REQUIRE_GPU();
  const int64_t rows = 5, cols = 67;
  const auto y = gpu_test::random_floats(size_t(rows * cols), 1);
  const auto b = gpu_test::random_floats(size_t(cols), 2);
  std::vector<float> want = y;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) want[size_t(i * cols + j)] += b[size_t(j)];
  gpu_test::DeviceBuffer<float> dy(y), db(b);
  INFERLAB_CUDA_OK(kernels::cuda::add_row_bias(dy.get(), db.get(), rows, cols, nullptr));
  EXPECT_EQ(dy.download(), want);
}

TEST(CudaHfCheckpoint, BiasesAndSlidingWindowsMatchTheCpuBackend) {
  INFERLAB_REQUIRE_GPU();
  if (reference_dir().empty()) GTEST_SKIP() << "tests/reference/hf_models not found from here";
  for (const auto& [name, index] : {std::pair{"qwen2", 0}, {"llama-sharded", 0}, {"mistral", 2}, {"llama31", 1}}) {
    SCOPED_TRACE(name);
    auto model = Model::load(reference_dir() / "hf_models" / name);
    ASSERT_TRUE(model.ok()) << model.message();
    auto cpu = gpu_test::make_engine(*model, BackendKind::Cpu, 8);
    auto gpu = gpu_test::make_engine(*model, BackendKind::Cuda, 8);
    auto eager = gpu_test::make_engine(*model, BackendKind::Cuda, 8, GpuDType::F16, false);
    ASSERT_TRUE(cpu && gpu && eager);
    const auto ids = prompt(name, size_t(index));
    const auto forced = greedy(*cpu, ids, 6);
    const auto want = all_logits(*cpu, ids, forced), got = all_logits(*gpu, ids, forced),
               got_eager = all_logits(*eager, ids, forced);
    ASSERT_EQ(got.size(), want.size());
    ASSERT_EQ(got_eager.size(), want.size());
    for (size_t r = 0; r < want.size(); ++r) {
      EXPECT_LT(gpu_test::normalized_error(got[r], want[r]), 1e-2) << "row " << r;  // f16 weights and activations
      EXPECT_EQ(got[r], got_eager[r]) << "row " << r << ": graph replay differs from the eager step";
    }
  }
}

}  // namespace test_cuda_hf_checkpoint
}  // namespace inferlab
