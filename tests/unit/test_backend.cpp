// Backend selection ("cpu", "cuda", "auto"), the GPU element type, and the
// synthetic real-shape presets: everything about the CUDA backend that can be
// checked without a GPU.
#include <gtest/gtest.h>

#include "engine/device.h"
#include "engine/engine.h"
#include "model/synthetic_model.h"
#include "naive_reference.h"
#include "test_support.h"

namespace inferlab {
namespace test_backend {

TEST(Backend, NamesParseAndAutoFollowsTheMachine) {
  EXPECT_EQ(*parse_backend("cpu"), BackendKind::Cpu);
  const bool gpu = cuda_compiled() && cuda_device_count() > 0;
  EXPECT_EQ(*parse_backend("auto"), gpu ? BackendKind::Cuda : BackendKind::Cpu);
  auto cuda = parse_backend("cuda");
  EXPECT_EQ(cuda.ok(), gpu);
  if (!gpu) {
    EXPECT_NE(cuda.message().find("backend \"cuda\""), std::string::npos) << cuda.message();
  }
  auto bad = parse_backend("tpu");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("not one of cpu, cuda, auto"), std::string::npos);
  EXPECT_STREQ(backend_name(BackendKind::Cuda), "cuda");
}

TEST(Backend, GpuDtypeNames) {
  EXPECT_EQ(*parse_gpu_dtype("f16"), GpuDType::F16);
  EXPECT_EQ(*parse_gpu_dtype("bfloat16"), GpuDType::BF16);
  EXPECT_FALSE(parse_gpu_dtype("fp8").ok());
}

TEST(Backend, CudaEngineWithoutAGpuIsAnErrorNotACrash) {
  if (cuda_compiled() && cuda_device_count() > 0) GTEST_SKIP() << "this machine has a GPU";
  SyntheticModelSpec spec;
  spec.name = "backend-tiny";
  auto model = test::load_synthetic(spec);
  EngineOptions options;
  options.backend = BackendKind::Cuda;
  auto engine = Engine::create(model, options);
  ASSERT_FALSE(engine.ok());
  EXPECT_NE(engine.message().find("CUDA"), std::string::npos) << engine.message();
}

TEST(Backend, AttentionIsTimedOnlyWhenAsked) {
  SyntheticModelSpec spec;
  spec.name = "timed-tiny";
  auto model = test::load_synthetic(spec);
  for (bool timed : {false, true}) {
    EngineOptions options;
    options.time_attention = timed;
    auto engine = Engine::create(model, options);
    ASSERT_TRUE(engine.ok());
    auto seq = (*engine)->new_sequence();
    ASSERT_TRUE((*engine)->prefill(*seq, test::random_tokens(model->config().n_vocab, 64, 1)).ok());
    EXPECT_EQ((*engine)->counters().attention_seconds > 0, timed);
    EXPECT_EQ((*engine)->counters().as_map().count("attention_ms"), timed ? 1u : 0u);
  }
}

TEST(SyntheticPresets, RealShapes) {
  auto llama3 = synthetic_preset("llama3-8b");
  ASSERT_TRUE(llama3.ok());
  const ModelConfig c = synthetic_config(*llama3);
  EXPECT_EQ(c.n_layers, 32);
  EXPECT_EQ(c.n_embd, 4096);
  EXPECT_EQ(c.n_ff, 14336);
  EXPECT_EQ(c.n_heads, 32);
  EXPECT_EQ(c.n_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.n_vocab, 128256);
  EXPECT_FLOAT_EQ(c.rope_theta, 500000.0f);
  EXPECT_FALSE(c.tied_embeddings);
  auto long7b = synthetic_preset("llama2-7b-128k", 2);
  ASSERT_TRUE(long7b.ok());
  EXPECT_EQ(long7b->n_layers, 2);
  EXPECT_EQ(long7b->context_length, 131072);
  EXPECT_EQ(long7b->n_kv_heads, 32);
  auto small = synthetic_preset("small");  // quick, and 64-dim heads for the CUDA kernels
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(synthetic_config(*small).head_dim, 64);
  auto unknown = synthetic_preset("llama9");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.message().find("llama2-7b, llama3-8b"), std::string::npos) << unknown.message();
  EXPECT_FALSE(synthetic_preset("llama2-7b", 33).ok());
}

TEST(SyntheticPresets, PaddedVocabularyIsWrittenAndConfigMatchesTheFile) {
  SyntheticModelSpec spec;
  spec.name = "padded";
  spec.n_vocab = 1000;
  auto model = test::load_synthetic(spec);
  ASSERT_NE(model, nullptr);
  const ModelConfig want = synthetic_config(spec);
  const ModelConfig& got = model->config();
  EXPECT_EQ(got.n_vocab, 1000);
  EXPECT_EQ(got.n_vocab, want.n_vocab);
  EXPECT_EQ(got.n_layers, want.n_layers);
  EXPECT_EQ(got.n_ff, want.n_ff);
  EXPECT_EQ(got.head_dim, want.head_dim);
  EXPECT_EQ(got.tied_embeddings, want.tied_embeddings);
  // The padding never comes out of tokenizing text, and the specials still work.
  const auto ids = model->tokenizer().encode("hello world <|im_start|>", false, true);
  ASSERT_FALSE(ids.empty());
  for (int32_t id : ids) EXPECT_LT(id, 256 + spec.n_merges + 3);
}

}  // namespace test_backend
}  // namespace inferlab
