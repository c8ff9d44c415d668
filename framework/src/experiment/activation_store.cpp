#include "experiment/activation_store.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>

#include "datasets/tasks.h"
#include "experiment/calibration.h"
#include "experiment/config.h"
#include "model/model.h"
#include "plugins/method_context.h"

namespace inferlab {

namespace fs = std::filesystem;

namespace {

int32_t tap_width(const ModelConfig& c, uint32_t tap) {
  switch (tap) {
    case kTapHiddenIn: case kTapAttentionIn: case kTapFfnIn: case kTapHiddenOut: return int32_t(c.n_embd);
    case kTapQueries: case kTapAttentionOut: return int32_t(c.q_dim());
    case kTapKeys: case kTapValues: return int32_t(c.kv_dim());
    case kTapFfnActivation: case kTapFfnGate: return int32_t(c.n_ff);
    default: return 0;
  }
}

std::span<const float> tap_values(const CalibrationTaps& t, uint32_t tap) {
  switch (tap) {
    case kTapHiddenIn: return t.hidden_in;
    case kTapQueries: return t.queries;
    case kTapKeys: return t.keys;
    case kTapAttentionOut: return t.attention_out;
    case kTapFfnActivation: return t.ffn_activation;
    case kTapValues: return t.values;
    case kTapAttentionIn: return t.attention_in;
    case kTapFfnIn: return t.ffn_in;
    case kTapFfnGate: return t.ffn_gate;
    case kTapHiddenOut: return t.hidden_out;
    default: return {};
  }
}

Status check_request(const CalibrationRequest& r) {
  if (r.samples < 1 || r.tokens < 2)
    return Error{fmt::format("activation capture: {} samples of {} tokens", r.samples, r.tokens)};
  if (const uint32_t unknown = r.taps & ~(kStorableTaps | kTapLogits); unknown != 0)
    return Error{fmt::format("activation capture: unknown tap bits {:#x}", unknown)};
  if ((r.taps & kStorableTaps) == 0) return Error{"activation capture: no tap to store (logits are not stored)"};
  return ok_status();
}

ActivationManifest expected_manifest(const Engine& engine, const CalibrationRequest& r) {
  ActivationManifest m;
  m.model_checksum = engine.model().checksum();
  m.arithmetic = arithmetic(engine);
  m.corpus = r.corpus;
  m.samples = r.samples;
  m.tokens = r.tokens;
  m.n_layers = int32_t(engine.config().n_layers);
  for (const uint32_t bit : tap_bits(r.taps & kStorableTaps)) m.widths[bit] = tap_width(engine.config(), bit);
  return m;
}

// Every data file of a store: (tap, layer, width); tap 0 is the token ids.
struct DataFile {
  uint32_t tap;
  int32_t layer, width;
};
std::vector<DataFile> data_files(const ActivationManifest& m) {
  std::vector<DataFile> out{{0, -1, 1}};
  for (const auto& [bit, width] : m.widths)
    for (int32_t l = 0; l < m.n_layers; ++l) out.push_back({bit, l, width});
  return out;
}

int64_t sample_bytes(const ActivationManifest& m) {
  int64_t per_row = 4;
  for (const auto& [bit, width] : m.widths) per_row += int64_t(width) * 4 * m.n_layers;
  return per_row * m.tokens;
}

Status append(const fs::path& path, const void* data, size_t bytes) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "ab"), &std::fclose);
  if (!f || std::fwrite(data, 1, bytes, f.get()) != bytes || std::fflush(f.get()) != 0)
    return Error{fmt::format("activation capture: cannot write {}", path.string())};
  return ok_status();
}

// manifest.txt replaced at once (a temporary file renamed over it).
Status write_manifest(const fs::path& dir, const ActivationManifest& m) {
  const fs::path path = dir / kActivationManifest, tmp = dir / (std::string(kActivationManifest) + ".tmp");
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << m.text();
    if (!out.flush()) return Error{fmt::format("activation capture: cannot write {}", tmp.string())};
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return Error{fmt::format("activation capture: cannot replace {}: {}", path.string(), ec.message())};
  return ok_status();
}

// Appends each layer's taps to their files as the layer arrives.
class StoreWriter final : public ForwardObserver {
 public:
  StoreWriter(const fs::path& dir, const ActivationManifest& m) : dir_(dir), m_(m) {}
  uint32_t taps() const override { return m_.taps(); }
  void on_layer(const CalibrationTaps& t) override {
    if (!error.ok() || t.layer < 0) return;
    for (const auto& [bit, width] : m_.widths) {
      const auto values = tap_values(t, bit);
      if (values.size() != size_t(t.n_tokens) * size_t(width)) {
        error = Error{fmt::format("activation capture: tap {} of layer {} has {} values, {} expected", tap_name(bit),
                                  t.layer, values.size(), size_t(t.n_tokens) * size_t(width))};
        return;
      }
      if (auto s = append(dir_ / activation_file_name(bit, t.layer), values.data(), values.size_bytes()); !s) {
        error = s;
        return;
      }
    }
  }
  Status error = ok_status();

 private:
  fs::path dir_;
  const ActivationManifest& m_;
};

// Files cut back to the committed rows (a partial tail goes), or made anew.
Status prepare_files(const fs::path& dir, const ActivationManifest& m) {
  const int64_t rows = int64_t(m.committed) * m.tokens;
  for (const DataFile& f : data_files(m)) {
    const fs::path path = dir / activation_file_name(f.tap, f.layer);
    if (m.committed > 0) {
      if (auto s = check_activation_file(path, f.tap, f.layer, f.width, rows, /*at_least=*/true); !s)
        return Error{"activation capture: " + s.message() + " (delete " + dir.string() + " to capture it again)"};
      std::error_code ec;
      fs::resize_file(path, uintmax_t(sizeof(ActivationFileHeader) + uint64_t(rows) * uint64_t(f.width) * 4), ec);
      if (ec) return Error{fmt::format("activation capture: cannot truncate {}: {}", path.string(), ec.message())};
      continue;
    }
    ActivationFileHeader h;
    h.tap = f.tap, h.layer = f.layer, h.width = f.width;
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out.write(reinterpret_cast<const char*>(&h), sizeof h) || !out.flush())
      return Error{fmt::format("activation capture: cannot write {}", path.string())};
  }
  return ok_status();
}

}  // namespace

fs::path default_activation_root(const fs::path& artifact_root) {
  return artifact_dir("activations", std::string(16, '0'), artifact_root).parent_path();
}

Result<std::string> activation_store_key(const CalibrationRequest& request, const std::string& arithmetic) {
  if (auto s = check_request(request); !s) return s.error();
  auto corpus = corpus_key(request.corpus);
  if (!corpus) return Error{"activation capture: " + corpus.message()};
  const nlohmann::json key = {{"format", kActivationStoreVersion}, {"corpus", *corpus},
                              {"samples", request.samples},        {"tokens", request.tokens},
                              {"taps", request.taps & kStorableTaps}, {"arithmetic", arithmetic}};
  return sha256_hex(key.dump()).substr(0, 16);
}

Result<fs::path> activation_store_dir(const Engine& engine, const CalibrationRequest& request, const fs::path& root) {
  auto key = activation_store_key(request, arithmetic(engine));
  if (!key) return key.error();
  return root / engine.model().checksum().substr(0, 16) / *key;
}

Result<fs::path> capture_activations(Engine& engine, const CalibrationRequest& request, const fs::path& root,
                                     const CaptureOptions& options) {
  auto dir = activation_store_dir(engine, request, root);
  if (!dir) return dir;
  ActivationManifest m = expected_manifest(engine, request);
  const fs::path manifest_path = *dir / kActivationManifest;
  std::error_code ec;
  if (fs::exists(manifest_path, ec)) {
    auto have = ActivationManifest::read(manifest_path);
    if (!have) return Error{"activation capture: " + have.message()};
    if (have->model_checksum != m.model_checksum || have->arithmetic != m.arithmetic || have->samples != m.samples ||
        have->tokens != m.tokens || have->n_layers != m.n_layers || have->widths != m.widths)
      return Error{fmt::format("activation capture: {} describes another capture (delete {} to capture it again)",
                               manifest_path.string(), dir->string())};
    m.committed = have->committed;
    if (m.committed == m.samples) {  // complete: reused as it is
      auto store = ActivationStore::open(*dir);
      if (!store) return Error{"activation capture: " + store.message()};
      return *dir;
    }
  }
  // Room for what remains, before anything is written.
  fs::path probe = *dir;
  while (!probe.empty() && !fs::exists(probe, ec) && probe.has_parent_path() && probe != probe.parent_path())
    probe = probe.parent_path();
  const int64_t need = int64_t(m.samples - m.committed) * sample_bytes(m);
  const auto space = fs::space(probe, ec);
  const int64_t free = options.free_bytes >= 0 ? options.free_bytes : ec ? INT64_MAX : int64_t(space.available);
  if (need > free)
    return Error{fmt::format("activation capture: the store needs {} bytes ({:.2f} GiB) more in {}; {} bytes "
                             "({:.2f} GiB) are free",
                             need, double(need) / double(1 << 30), dir->string(), free, double(free) / double(1 << 30))};

  auto windows = corpus_windows(engine.model().tokenizer(), request.corpus, request.samples, request.tokens, 0);
  if (!windows) return Error{"activation capture: " + windows.message()};
  fs::create_directories(*dir, ec);
  if (ec) return Error{fmt::format("activation capture: cannot create {}: {}", dir->string(), ec.message())};
  if (auto s = prepare_files(*dir, m); !s) return s.error();
  if (auto s = write_manifest(*dir, m); !s) return s.error();
  if (auto s = engine.set_method(nullptr, 0); !s) return s.error();

  StoreWriter writer(*dir, m);
  const int32_t stop = options.max_new_samples < 0 ? m.samples : std::min(m.samples, m.committed + options.max_new_samples);
  for (int32_t i = m.committed; i < stop; ++i) {
    const auto& tokens = (*windows)[size_t(i)];
    auto seq = engine.new_sequence();
    auto s = engine.forward(*seq, tokens, int64_t(tokens.size()), [](int64_t, std::span<const float>) {}, &writer);
    if (!s) return Error{"activation capture: " + s.message()};
    if (!writer.error) return writer.error.error();
    if (auto a = append(*dir / activation_file_name(0, -1), tokens.data(), tokens.size() * sizeof(int32_t)); !a)
      return a.error();
    m.committed = i + 1;  // the sample is complete: committed
    if (auto w = write_manifest(*dir, m); !w) return w.error();
  }
  return *dir;
}

}  // namespace inferlab
