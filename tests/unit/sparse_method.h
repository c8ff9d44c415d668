// A method that declares activation sparsity (Method::activation_sparsity)
// and nothing else: the engine mechanism's tests on both backends.
#pragma once

#include <utility>

#include "inferlab/plugin.h"

namespace inferlab::test {

class SparseMethod final : public Method {
 public:
  explicit SparseMethod(ActivationSparsity a) : a_(std::move(a)) {}
  ActivationSparsity activation_sparsity() const override { return a_; }

 private:
  ActivationSparsity a_;
};

}  // namespace inferlab::test
