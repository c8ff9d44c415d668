#include "tokenizer/chat_template.h"

#include <fmt/format.h>

namespace inferlab {

namespace {

bool contains(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? std::string() : s.substr(a, b - a + 1);
}

// A ChatML template's literal system message: the text between
// "<|im_start|>system\n" and "<|im_end|>" when nothing in it is a template
// expression (a template that only passes the user's system message through
// has none).
std::string chatml_default_system(const std::string& t) {
  static const std::string open = "<|im_start|>system\n", close = "<|im_end|>";
  const size_t a = t.find(open);
  if (a == std::string::npos) return {};
  const size_t from = a + open.size(), b = t.find(close, from);
  if (b == std::string::npos) return {};
  const std::string text = t.substr(from, b - from);
  if (contains(text, "{{") || contains(text, "{%") || contains(text, "'") || contains(text, "\"")) return {};
  return text;
}

}  // namespace

Result<ChatTemplate> parse_chat_template(const std::string& jinja, const std::string& source) {
  if (jinja.empty())
    return Error{fmt::format("{}: the model has no chat template (tokenizer.chat_template); give the prompt in the "
                             "model's format yourself, without --chat",
                             source)};
  ChatTemplate t;
  if (contains(jinja, "<|im_start|>") && contains(jinja, "<|im_end|>")) {
    t.format = ChatFormat::ChatML;
    t.default_system = chatml_default_system(jinja);
    return t;
  }
  if (contains(jinja, "<|start_header_id|>") && contains(jinja, "<|eot_id|>")) {
    t.format = ChatFormat::Llama3;
    return t;
  }
  return Error{fmt::format("{}: the chat template is not one of the formats inferlab renders (ChatML, Llama-3); give "
                           "the prompt in the model's format yourself, without --chat",
                           source)};
}

std::string render_chat(const ChatTemplate& t, const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string out;
  if (t.format == ChatFormat::ChatML) {
    if (!t.default_system.empty() && (messages.empty() || messages.front().role != "system"))
      out += "<|im_start|>system\n" + t.default_system + "<|im_end|>\n";
    for (const ChatMessage& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
    return out;
  }
  out = "<|begin_of_text|>";
  for (const ChatMessage& m : messages)
    out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + trim(m.content) + "<|eot_id|>";
  if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

const char* end_of_turn(ChatFormat format) { return format == ChatFormat::ChatML ? "<|im_end|>" : "<|eot_id|>"; }

}  // namespace inferlab
