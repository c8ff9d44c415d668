// Byte-level BPE (GPT-2 style) behind the Tokenizer interface. Private to tokenizer/.
#pragma once

#include <memory>

#include "inferlab/result.h"
#include "tokenizer/tokenizer.h"

namespace inferlab::tokenizer_detail {

// `vocab.model` must already be "gpt2"; everything else is validated here.
Result<std::unique_ptr<Tokenizer>> make_bpe_tokenizer(TokenizerVocab vocab);

}  // namespace inferlab::tokenizer_detail
