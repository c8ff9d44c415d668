// A test plugin that fails the ways a broken method can, in its evict hook
// (called after every layer's attention): fault = "segv" (a write to an
// unmapped address), "abort", "throw", "hang" (sleeps forever), "hog" (allocates
// without bound), or "none" (drops nothing: the run is dense). The runner must
// fail that run alone and name the reason (tests/unit/test_isolation.cpp).
#include <chrono>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "inferlab/plugin_export.h"

namespace {

using namespace inferlab;

class FaultyMethod final : public Method {
 public:
  explicit FaultyMethod(std::string fault) : fault_(std::move(fault)) {}

  void evict(const StepInfo&, const KvView&, int32_t, int32_t, std::vector<int32_t>&) override {
    if (fault_ == "segv") {
      *bad_address_ = 1;
    } else if (fault_ == "abort") {
      std::abort();
    } else if (fault_ == "throw") {
      throw std::runtime_error("faulty: thrown on purpose");
    } else if (fault_ == "hang") {
      for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
    } else if (fault_ == "hog") {
      // Chunks left untouched: a memory limit stops this long before it costs
      // real memory. Without one it gives up at 1 TiB, so the run fails anyway.
      for (size_t held = 0; held < (size_t(1) << 40); held += kChunk) hoard_.emplace_back(new char[kChunk]);
      throw std::runtime_error("faulty: allocated 1 TiB and no memory limit stopped it");
    }
  }

 private:
  static constexpr size_t kChunk = size_t(64) << 20;
  // In the first page, which no process maps, yet not null, so a sanitizer's
  // null check lets the write through to the fault; volatile, so the
  // compiler cannot drop or trap it.
  static inline int* volatile bad_address_ = reinterpret_cast<int*>(64);
  std::string fault_;
  std::vector<std::unique_ptr<char[]>> hoard_;
};

class FaultyPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    return {"faulty", "1.0.0", "fails on purpose in its evict hook (runner isolation tests)", hooks_of<FaultyMethod>(),
            {ParamSpec::string("fault", "none", {"none", "segv", "abort", "throw", "hang", "hog"},
                               "how evict fails")}};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& params) const override {
    return std::unique_ptr<Method>(std::make_unique<FaultyMethod>(params.get_string("fault")));
  }
};

}  // namespace

INFERLAB_PLUGIN(FaultyPlugin)
