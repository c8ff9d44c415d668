// Chat templates (tokenizer/chat_template.h) against transformers
// (tests/reference/make_chat_template_fixture.py): SmolLM2's own ChatML
// template with its default system message, rendered by apply_chat_template,
// and a Llama-3-format template rendered by jinja2; the same text here for
// each conversation, with and without the generation prompt, and for SmolLM2
// the same token ids; templates of other formats refused.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "test_support.h"
#include "tokenizer/chat_template.h"

namespace inferlab {
namespace test_chat_template {

nlohmann::json fixture() {
  std::ifstream in(std::filesystem::path(__FILE__).parent_path() / "../reference/chat_template_cases.json");
  EXPECT_TRUE(in) << "missing fixture chat_template_cases.json";
  return nlohmann::json::parse(in);
}

std::vector<ChatMessage> messages_of(const nlohmann::json& j) {
  std::vector<ChatMessage> out;
  for (const auto& m : j) out.push_back({m.at("role").get<std::string>(), m.at("content").get<std::string>()});
  return out;
}

TEST(ChatTemplate, RendersAsTransformersDoes) {
  const auto doc = fixture();
  for (const char* name : {"smollm2", "llama3"}) {
    auto t = parse_chat_template(doc.at(name).at("template").get<std::string>(), name);
    ASSERT_TRUE(t.ok()) << t.message();
    EXPECT_EQ(t->format, std::string(name) == "smollm2" ? ChatFormat::ChatML : ChatFormat::Llama3);
    for (const auto& c : doc.at(name).at("cases"))
      EXPECT_EQ(render_chat(*t, messages_of(c.at("messages")), c.at("add_generation_prompt").get<bool>()),
                c.at("text").get<std::string>())
          << name << ": " << c.at("messages").dump();
  }
  auto smol = parse_chat_template(doc.at("smollm2").at("template").get<std::string>(), "smollm2");
  EXPECT_EQ(smol->default_system, "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  EXPECT_STREQ(end_of_turn(ChatFormat::ChatML), "<|im_end|>");
  EXPECT_STREQ(end_of_turn(ChatFormat::Llama3), "<|eot_id|>");
}

TEST(ChatTemplate, SmolLM2sOwnTemplateGivesTransformersTokens) {
  auto model = test::default_model();
  if (!model) GTEST_SKIP() << "SmolLM2-135M-Instruct is not installed (scripts/fetch-model.sh)";
  const auto doc = fixture();
  auto t = parse_chat_template(model->chat_template(), model->path().string());
  ASSERT_TRUE(t.ok()) << t.message();
  EXPECT_EQ(model->chat_template(), doc.at("smollm2").at("template").get<std::string>());
  for (const auto& c : doc.at("smollm2").at("cases")) {
    const std::string text = render_chat(*t, messages_of(c.at("messages")), c.at("add_generation_prompt").get<bool>());
    EXPECT_EQ(model->tokenizer().encode(text, false, /*parse_special=*/true),
              c.at("tokens").get<std::vector<int32_t>>());
  }
  // The turn ends with one special token, which is also the model's EOS.
  const auto turn_end = model->tokenizer().encode(end_of_turn(t->format), false, true);
  ASSERT_EQ(turn_end.size(), 1u);
  EXPECT_EQ(turn_end[0], model->tokenizer().eos());
}

TEST(ChatTemplate, OtherFormatsAreRefusedNamingTheSource) {
  auto none = parse_chat_template("", "model.gguf");
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.message().find("model.gguf: the model has no chat template"), std::string::npos);
  auto other = parse_chat_template("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}", "m.gguf");
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.message().find("not one of the formats inferlab renders (ChatML, Llama-3)"), std::string::npos);
  // A ChatML template that only passes the user's system message through has no default.
  auto plain = parse_chat_template(
      "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}", "x");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->default_system, "");
  EXPECT_EQ(render_chat(*plain, {{"user", "hi"}}, true), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

}  // namespace test_chat_template
}  // namespace inferlab
