// Early returns for the tokenizer readers, which check one key after another.
// Private to tokenizer/; a file that includes this #undefs both at its end.
#pragma once

#include <utility>

// Moves the value of the Result `expr` into `out`, or returns its error.
#define INFERLAB_TRY_ASSIGN(out, expr)            \
  do {                                            \
    auto try_result_ = (expr);                    \
    if (!try_result_) return try_result_.error(); \
    out = std::move(try_result_.value());         \
  } while (0)

// Returns the error of the Result or Status `expr`, if any.
#define INFERLAB_TRY(expr)                        \
  do {                                            \
    auto try_result_ = (expr);                    \
    if (!try_result_) return try_result_.error(); \
  } while (0)
