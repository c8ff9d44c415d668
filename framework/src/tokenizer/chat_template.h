// Chat prompts for instruct models, rendered as the model's own chat template
// would render them. The template (tokenizer.chat_template in the GGUF file,
// a Jinja program) is recognized as one of the common formats and rendered
// natively, without a Jinja interpreter:
//   ChatML   <|im_start|>{role}\n{content}<|im_end|>\n per message, then
//            <|im_start|>assistant\n; a system message the template inserts
//            when the conversation has none (SmolLM2's) is read from it
//   Llama-3  <|begin_of_text|>, then <|start_header_id|>{role}<|end_header_id|>
//            \n\n{content, trimmed}<|eot_id|> per message, then the
//            assistant's header
// Anything else is refused with the formats known, not guessed.
#pragma once

#include <string>
#include <vector>

#include "inferlab/result.h"

namespace inferlab {

struct ChatMessage {
  std::string role;  // system, user, assistant
  std::string content;
};

enum class ChatFormat { ChatML, Llama3 };

struct ChatTemplate {
  ChatFormat format = ChatFormat::ChatML;
  std::string default_system;  // inserted when the conversation has no system message; empty: none
};

// `source` names the template in errors (e.g. the model file).
Result<ChatTemplate> parse_chat_template(const std::string& jinja, const std::string& source);

// The prompt text (special tokens written as text: encode it with
// parse_special); with add_generation_prompt, ending with the assistant's
// header so the model answers.
std::string render_chat(const ChatTemplate& t, const std::vector<ChatMessage>& messages, bool add_generation_prompt);

// The special token that ends a turn in this format ("<|im_end|>", "<|eot_id|>").
const char* end_of_turn(ChatFormat format);

}  // namespace inferlab
