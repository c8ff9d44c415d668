// Self-speculative decoding (Method::speculation, Engine::speculate, the token
// loop): whatever the drafts, the loop chooses what the plain loop chooses,
// from the same rows, once each; the engine's drafts are the first layers'
// greedy tokens and leave no KV behind; logits after dropped drafts equal a
// fresh run's; a speculation that does not fit is refused before any token.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "engine/engine.h"
#include "engine/generation.h"
#include "engine/sampler.h"
#include "speculation_methods.h"
#include "test_support.h"

namespace inferlab {
namespace test_speculation {

// ---- The token loop, on a made-up model -------------------------------------

constexpr int32_t kVocab = 40;

// The made-up model's logits after a prefix: a hash of the whole prefix.
std::vector<float> toy_logits(const std::vector<int32_t>& prefix) {
  uint64_t h = 1469598103934665603ull;
  for (int32_t t : prefix) h = (h ^ uint64_t(t + 1)) * 1099511628211ull;
  std::mt19937_64 rng(h);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<float> out(static_cast<size_t>(kVocab));
  for (float& x : out) x = dist(rng);
  return out;
}

using test::argmax_of;

struct ToyRun {
  std::vector<int32_t> tokens;
  bool stopped = false;
  int64_t chooses = 0;
  std::vector<int32_t> cache;  // what the made-up cache holds at the end
  int64_t drafted = 0, dropped = 0, rows_used = 0;
};

// Generates from `prompt` with `choose`; with `accept_rate` >= 0, a made-up
// drafter that proposes the model's greedy token with that probability (else
// another token) speculates up to `length` drafts per step.
ToyRun toy_generate(const std::vector<int32_t>& prompt, int32_t max_tokens, std::span<const int32_t> stops,
                    const std::function<int32_t(std::span<const float>)>& choose, double accept_rate, int32_t length,
                    int32_t context = 1 << 20) {
  ToyRun run;
  run.cache = prompt;
  std::mt19937_64 drafter(7);
  TokenLoop loop;
  loop.choose = [&](std::span<const float> l) {
    ++run.chooses;
    return choose(l);
  };
  loop.decode = [&](int32_t token, std::vector<float>& logits) -> Status {
    run.cache.push_back(token);
    logits = toy_logits(run.cache);
    return ok_status();
  };
  loop.context_full = [&] { return int32_t(run.cache.size()) >= context; };
  if (accept_rate >= 0) {
    loop.speculate = [&](int32_t token, int32_t max_drafts, std::vector<int32_t>& drafts,
                         std::vector<float>& rows) -> Status {
      EXPECT_GE(max_drafts, 0);
      const int32_t n = std::clamp(std::min(length, max_drafts), 0, context - int32_t(run.cache.size()) - 1);
      drafts.clear();
      rows.clear();
      run.cache.push_back(token);
      for (int32_t i = 0; i <= n; ++i) {
        const std::vector<float> l = toy_logits(run.cache);
        rows.insert(rows.end(), l.begin(), l.end());
        if (i == n) break;
        const int32_t greedy = argmax_of(l);
        const int32_t draft =
            std::uniform_real_distribution<double>(0, 1)(drafter) < accept_rate ? greedy : (greedy + 1) % kVocab;
        drafts.push_back(draft);
        run.cache.push_back(draft);
      }
      run.drafted += n;
      return ok_status();
    };
    loop.drop = [&](int32_t count, bool) -> Status {
      EXPECT_LE(size_t(count), run.cache.size());
      run.cache.resize(run.cache.size() - size_t(count));
      run.dropped += count;
      return ok_status();
    };
    loop.on_speculated = [&](int32_t used) { run.rows_used += used; };
  }
  auto out = run_token_loop(toy_logits(prompt), max_tokens, stops, loop);
  EXPECT_TRUE(out.ok()) << (out.ok() ? "" : out.message());
  if (out.ok()) {
    run.tokens = out->tokens;
    run.stopped = out->stopped_at_eos;
  }
  return run;
}

TEST(TokenLoop, SpeculationChoosesWhatThePlainLoopChoosesFromTheSameRows) {
  const std::vector<int32_t> prompt = {3, 1, 4, 1, 5};
  const std::vector<int32_t> no_stops = {-1};
  for (const int32_t max_tokens : {1, 2, 7, 40})
    for (const double rate : {0.0, 0.5, 0.9, 1.0})
      for (const int32_t length : {1, 3, 8}) {
        SCOPED_TRACE(testing::Message() << "max " << max_tokens << ", accept " << rate << ", drafts " << length);
        const ToyRun plain = toy_generate(prompt, max_tokens, no_stops, argmax_of, -1, 0);
        const ToyRun spec = toy_generate(prompt, max_tokens, no_stops, argmax_of, rate, length);
        ASSERT_EQ(plain.tokens.size(), size_t(max_tokens));
        EXPECT_EQ(spec.tokens, plain.tokens);
        EXPECT_EQ(spec.chooses, plain.chooses);  // one choice per row, as without speculation
        EXPECT_EQ(spec.rows_used, plain.chooses - 1);  // every row after the prompt's came from a speculation
        // The cache holds the prompt and the kept tokens (the last one too, when it was a draft).
        std::vector<int32_t> kept = prompt;
        kept.insert(kept.end(), spec.tokens.begin(), spec.tokens.end());
        ASSERT_LE(spec.cache.size(), kept.size());
        EXPECT_GE(spec.cache.size() + 1, kept.size());
        EXPECT_TRUE(std::equal(spec.cache.begin(), spec.cache.end(), kept.begin()));
        if (rate == 1.0 && max_tokens > 2) {
          EXPECT_EQ(spec.dropped, 0);
          EXPECT_GT(spec.drafted, 0);
        }
        if (rate == 0.0) {
          EXPECT_EQ(spec.dropped, spec.drafted);  // every draft rejected
        }
      }
}

TEST(TokenLoop, SpeculationKeepsASamplersRandomStreamAndStopsWhereThePlainLoopStops) {
  const std::vector<int32_t> prompt = {9, 2, 6};
  auto sampler_choose = [](uint64_t seed) {
    auto rng = std::make_shared<std::mt19937_64>(seed);
    return [rng](std::span<const float> l) {
      std::vector<double> p(l.size());
      const float m = *std::max_element(l.begin(), l.end());
      for (size_t i = 0; i < l.size(); ++i) p[i] = std::exp(double(l[i] - m));
      std::discrete_distribution<int32_t> d(p.begin(), p.end());
      return d(*rng);
    };
  };
  for (const double rate : {0.3, 0.8}) {
    const ToyRun plain = toy_generate(prompt, 60, std::vector<int32_t>{-1}, sampler_choose(11), -1, 0);
    const ToyRun spec = toy_generate(prompt, 60, std::vector<int32_t>{-1}, sampler_choose(11), rate, 5);
    EXPECT_EQ(spec.tokens, plain.tokens);
    EXPECT_EQ(spec.chooses, plain.chooses);
  }
  // A stop token: the same stop, and no draft left in the cache beyond what was kept.
  const ToyRun plain = toy_generate(prompt, 60, std::vector<int32_t>{-1}, argmax_of, -1, 0);
  ASSERT_GT(plain.tokens.size(), 10u);
  const std::vector<int32_t> stops = {plain.tokens[9]};
  const auto stop_at = size_t(std::find(plain.tokens.begin(), plain.tokens.end(), stops[0]) - plain.tokens.begin());
  const ToyRun plain_stop = toy_generate(prompt, 60, stops, argmax_of, -1, 0);
  const ToyRun spec_stop = toy_generate(prompt, 60, stops, argmax_of, 0.9, 6);
  EXPECT_TRUE(plain_stop.stopped);
  EXPECT_TRUE(spec_stop.stopped);
  EXPECT_EQ(plain_stop.tokens.size(), stop_at);
  EXPECT_EQ(spec_stop.tokens, plain_stop.tokens);
  EXPECT_LE(spec_stop.cache.size(), prompt.size() + stop_at + 1);
  // A full context: the loop stops where the plain one does, and drafts never pass the context.
  const ToyRun plain_full = toy_generate(prompt, 60, std::vector<int32_t>{-1}, argmax_of, -1, 0, 20);
  const ToyRun spec_full = toy_generate(prompt, 60, std::vector<int32_t>{-1}, argmax_of, 1.0, 6, 20);
  EXPECT_EQ(spec_full.tokens, plain_full.tokens);
  EXPECT_LE(spec_full.cache.size(), 20u);
}

// ---- The engine's mechanism, on a synthetic model ---------------------------

constexpr int32_t kLayers = 4;

std::shared_ptr<Model> spec_model() {
  return test::shared_synthetic({.name = "speculation", .n_layers = kLayers, .n_heads = 4, .n_kv_heads = 2, .seed = 41});
}

const std::vector<int32_t>& prompt() {
  static const std::vector<int32_t> p = test::random_tokens(spec_model()->config().n_vocab, 13, 9);
  return p;
}

using test::Speculating;

std::unique_ptr<Engine> new_engine() {
  auto engine = Engine::create(spec_model(), EngineOptions{4, 0, 0});
  EXPECT_TRUE(engine.ok()) << (engine.ok() ? "" : engine.message());
  return engine.ok() ? std::move(*engine) : nullptr;
}

void expect_tables_hold(const Engine& engine, const KvSequence& seq, int32_t n) {
  for (int32_t l = 0; l < engine.config().n_layers; ++l)
    for (int32_t g = 0; g < engine.config().n_kv_heads; ++g) {
      const HeadPageTable& t = seq.table(l, g);
      ASSERT_EQ(t.n_tokens(), n) << "layer " << l << ", kv head " << g;
      for (int32_t i = 0; i < n; ++i) EXPECT_EQ(t.positions[size_t(i)], i);
    }
}

TEST(Speculation, DraftsAreTheFirstLayersGreedyTokensAndLeaveNoKvBehind) {
  for (const int32_t exit : {1, 2, kLayers - 1}) {
    SCOPED_TRACE(testing::Message() << "exit layer " << exit);
    const int32_t n = int32_t(prompt().size());
    // What the first `exit` layers choose from the token on, one decode step each.
    auto reference = new_engine();
    const test::DraftChain chain = test::first_layers_chain(*reference, prompt(), exit, 5);
    int32_t token = chain.token;
    const std::vector<int32_t>& expected = chain.drafts;

    auto engine = new_engine();
    Speculating method;
    method.spec = {exit, 5};
    ASSERT_TRUE(engine->set_method(&method, 0).ok());
    Engine::Speculated made;
    auto seq = test::speculate_after_prompt(*engine, prompt(), token, 100, made);
    EXPECT_EQ(made.drafts, expected);
    // Every layer holds the prompt, the token and its drafts, from the verifying call.
    expect_tables_hold(*engine, *seq, n + 6);
    EXPECT_EQ(seq->n_past(), n + 6);
    const EngineCounters& c = engine->counters();
    EXPECT_EQ(c.draft_steps, 5);
    EXPECT_EQ(c.drafted_tokens, 5);
    EXPECT_EQ(c.verify_calls, 1);
    EXPECT_EQ(c.layers_skipped, 5 * (kLayers - exit));  // the drafts' layers above the exit, nothing else

    // The rows are a dense forward of the token and the drafts.
    auto dense = new_engine();
    auto dense_seq = dense->new_sequence();
    ASSERT_TRUE(dense->prefill(*dense_seq, prompt()).ok());
    std::vector<int32_t> fed = {token};
    fed.insert(fed.end(), made.drafts.begin(), made.drafts.end());
    std::vector<float> rows;
    ASSERT_TRUE(dense->forward(*dense_seq, fed, 0, [&](int64_t, std::span<const float> l) {
      rows.insert(rows.end(), l.begin(), l.end());
    }).ok());
    EXPECT_EQ(made.rows, rows);  // the same call on the same cache: bit for bit
  }
}

TEST(Speculation, LogitsAfterDroppedDraftsEqualAFreshRun) {
  const int32_t n = int32_t(prompt().size());
  const int32_t vocab = spec_model()->config().n_vocab;
  auto engine = new_engine();
  Speculating method;
  method.spec = {2, 6};
  ASSERT_TRUE(engine->set_method(&method, 0).ok());
  int32_t token = -1;  // the model's choice after the prompt
  Engine::Speculated made;
  auto seq = test::speculate_after_prompt(*engine, prompt(), token, 6, made);
  ASSERT_EQ(made.drafts.size(), 6u);
  engine->reset_counters();
  ASSERT_TRUE(engine->drop_drafts(*seq, 4, true).ok());  // keep the token and two drafts
  EXPECT_EQ(engine->counters().drafts_rejected, 4);
  expect_tables_hold(*engine, *seq, n + 3);
  const int32_t next = (token + 17) % vocab;
  auto after = engine->decode(*seq, next);
  ASSERT_TRUE(after.ok());

  // Fresh: the prompt, then the kept tokens in one call, then the same token.
  // The kept rows went through a call of 7 rows instead of 3; the CPU backend
  // computes a row the same whatever the call's other rows: bit for bit.
  auto fresh = new_engine();
  const std::vector<float> expected = test::fresh_decode(*fresh, prompt(), {token, made.drafts[0], made.drafts[1]}, next);
  ASSERT_FALSE(expected.empty());
  EXPECT_EQ(*after, expected);
}

TEST(Speculation, GreedyGenerationEqualsDense) {
  const int32_t max_tokens = 40;
  const SamplerOptions greedy{};
  auto dense_engine = new_engine();
  auto dense = generate(*dense_engine, prompt(), max_tokens, greedy, {});
  ASSERT_TRUE(dense.ok());
  for (const auto& [exit, length] : std::vector<std::pair<int32_t, int32_t>>{{1, 1}, {2, 4}, {3, 8}}) {
    SCOPED_TRACE(testing::Message() << "exit " << exit << ", drafts " << length);
    auto engine = new_engine();
    Speculating method;
    method.spec = {exit, length};
    ASSERT_TRUE(engine->set_method(&method, 0).ok());
    auto got = generate(*engine, prompt(), max_tokens, greedy, {});
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(got->tokens, dense->tokens);
    const EngineCounters& c = engine->counters();
    EXPECT_GT(c.verify_calls, 0);
    EXPECT_EQ(c.drafted_tokens, c.draft_steps);
    // Every token after the first was chosen from a verifying row: each call
    // gave its accepted drafts' rows and one more (a stop is chosen from one too).
    const int64_t accepted = c.drafted_tokens - c.drafts_rejected - c.drafts_unused;
    EXPECT_GE(accepted, 0);
    EXPECT_EQ(c.verify_calls + accepted, int64_t(got->tokens.size()) - 1 + (got->stopped_at_eos ? 1 : 0));
  }
}

TEST(Speculation, ASpeculationThatDoesNotFitIsRefusedBeforeAnyToken) {
  auto engine = new_engine();
  const auto refused = [&](Speculation spec, uint32_t hooks, const std::string& expected) {
    Speculating method;
    method.spec = spec;
    const Status s = engine->set_method(&method, hooks, nullptr, "spec");
    ASSERT_FALSE(s.ok()) << "exit " << spec.exit_layer << ", drafts " << spec.draft_length;
    EXPECT_NE(s.message().find(expected), std::string::npos) << s.message();
    EXPECT_FALSE(engine->has_method());
  };
  refused({kLayers, 4}, 0, "drafts run 1..3 of its 4 layers");
  refused({-1, 4}, 0, "drafts run 1..3");
  refused({0, 4}, 0, "drafts run 1..3");
  refused({2, 0}, 0, "1..64");
  refused({2, kMaxDraftLength + 1}, 0, "1..64");
  refused({2, 4}, kHookEviction, "a truncate cannot bring back");
  refused({2, 4}, kHookRetention, "a truncate cannot bring back");

  auto seq = engine->new_sequence();
  ASSERT_TRUE(engine->prefill(*seq, prompt()).ok());
  Engine::Speculated made;
  const Status none = engine->speculate(*seq, 1, 4, made);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.message().find("does not speculate"), std::string::npos);
  const Status too_many = engine->drop_drafts(*seq, int32_t(prompt().size()) + 1, true);
  ASSERT_FALSE(too_many.ok());
  EXPECT_NE(too_many.message().find("drop_drafts"), std::string::npos);
}

TEST(Speculation, NearTheContextsEndFewerDraftsAreMade) {
  auto engine_made = Engine::create(spec_model(), EngineOptions{4, int32_t(prompt().size()) + 4, 0});
  ASSERT_TRUE(engine_made.ok());
  Engine& engine = **engine_made;
  Speculating method;
  method.spec = {2, 8};
  ASSERT_TRUE(engine.set_method(&method, 0).ok());
  auto seq = engine.new_sequence();
  ASSERT_TRUE(engine.prefill(*seq, prompt()).ok());
  Engine::Speculated made;
  ASSERT_TRUE(engine.speculate(*seq, 5, 100, made).ok());
  EXPECT_EQ(made.drafts.size(), 3u);  // the token and 3 drafts fill the 4 places left
  EXPECT_EQ(seq->n_past(), engine.max_context());
  EXPECT_EQ(made.rows.size(), 4u * size_t(engine.config().n_vocab));
  // A full context: nothing is drafted, and the verifying call is refused.
  const Status full = engine.speculate(*seq, 5, 100, made);
  ASSERT_FALSE(full.ok());
  EXPECT_NE(full.message().find("context length exceeded"), std::string::npos) << full.message();
  EXPECT_TRUE(made.drafts.empty());
  EXPECT_EQ(seq->n_past(), engine.max_context());
}

}  // namespace test_speculation
}  // namespace inferlab
