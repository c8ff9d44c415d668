#include "cpu/quant4.h"

#include <cblas.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "cpu/cpu_ops.h"

namespace inferlab::kernels::cpu {

namespace {

constexpr std::array<float, 16> kNf4 = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};

// The signed dynamic map (Dettmers 2015): for exponents 10^-6 .. 10^0, 2^i
// fraction means of linspace(0.1, 1) each side of 0, plus 0 and 1, sorted.
std::array<float, 256> make_dynamic_map() {
  std::vector<float> data;
  for (int i = 0; i < 7; ++i) {
    const int items = (1 << i) + 1;
    const float scale = float(std::pow(10.0, -6 + i));
    // torch.linspace(0.1, 1, items) in float32 (the first half counted from
    // the start, the rest back from the end), then the means of neighbours.
    const float step = (1.0f - 0.1f) / float(items - 1);
    auto at = [&](int k) { return k < items / 2 ? 0.1f + step * float(k) : 1.0f - step * float(items - 1 - k); };
    for (int k = 0; k + 1 < items; ++k) {
      const float mean = (at(k) + at(k + 1)) / 2.0f;
      data.push_back(scale * mean);
      data.push_back(-scale * mean);
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  std::array<float, 256> out{};
  std::copy(data.begin(), data.end(), out.begin());
  return out;
}

constexpr std::array<float, 16> kFp4 = {0.0f,  0.0052083333f,  0.6666667f,  1.0f,  0.3333333f,  0.5f,
                                         0.1666667f,  0.25f, -0.0f, -0.0052083333f, -0.6666667f, -1.0f,
                                         -0.3333333f, -0.5f, -0.1666667f, -0.25f};

constexpr std::array<float, 16> make_int4() {
  std::array<float, 16> l{};
  for (int c = 0; c < 16; ++c) l[size_t(c)] = float(c - 7) / 7.0f;
  return l;
}
constexpr std::array<float, 16> kInt4 = make_int4();

// The index of the nearest of ascending levels (midpoints decide, ties to the lower).
uint8_t nearest_ascending(const std::array<float, 16>& levels, int n, float x) {
  uint8_t i = 0;
  while (i + 1 < n && x > (levels[i] + levels[i + 1]) / 2.0f) ++i;
  return i;
}

// FP4's magnitude code: bitsandbytes' decision tree over the midpoints of
// 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1.
uint8_t fp4_magnitude(float t) {
  if (t > 0.29166667f) {
    if (t > 0.583333f) return t > 0.8333333f ? 3 : 2;
    return t > 0.4166667f ? 5 : 4;
  }
  if (t > 0.0859375f) return t > 0.20833333f ? 7 : 6;
  return t > 0.00260417f ? 1 : 0;
}

uint8_t nearest_in(std::span<const float> map, float x) {
  const auto it = std::lower_bound(map.begin(), map.end(), x);
  if (it == map.begin()) return 0;
  if (it == map.end()) return uint8_t(map.size() - 1);
  const size_t hi = size_t(it - map.begin());
  return uint8_t(x - map[hi - 1] <= map[hi] - x ? hi - 1 : hi);
}

}  // namespace

const char* quant4_name(Quant4Format format) {
  switch (format) {
    case Quant4Format::NF4: return "nf4";
    case Quant4Format::FP4: return "fp4";
    case Quant4Format::Int4: return "int4";
  }
  return "?";
}

std::span<const float> quant4_levels(Quant4Format format) {
  switch (format) {
    case Quant4Format::FP4: return kFp4;
    case Quant4Format::Int4: return kInt4;
    case Quant4Format::NF4: break;
  }
  return kNf4;
}

uint8_t quant4_encode(Quant4Format format, float x) {
  switch (format) {
    case Quant4Format::FP4: return uint8_t((x < 0 ? 8 : 0) | fp4_magnitude(std::fabs(x)));
    case Quant4Format::Int4: return nearest_ascending(kInt4, 15, x);
    case Quant4Format::NF4: break;
  }
  return nearest_ascending(kNf4, 16, x);
}

std::span<const float> dynamic_map_signed() {
  static const std::array<float, 256> map = make_dynamic_map();
  return map;
}

float Quant4Tensor::block_absmax(int64_t b) const {
  if (!double_quant) return absmax[size_t(b)];
  return dynamic_map_signed()[absmax_codes[size_t(b)]] * absmax_scale[size_t(b / kQuant4AbsmaxBlock)] + absmax_offset;
}

int64_t Quant4Tensor::bytes() const {
  return int64_t(codes.size() + absmax.size() * 4 + absmax_codes.size() + absmax_scale.size() * 4) +
         (double_quant ? 4 : 0);
}

Quant4Tensor quant4_quantize(const float* w, int64_t rows, int64_t cols, Quant4Format format, int32_t block,
                             bool double_quant) {
  Quant4Tensor t;
  t.format = format;
  t.rows = rows;
  t.cols = cols;
  t.block = block;
  t.double_quant = double_quant;
  const int64_t n = rows * cols, blocks = t.blocks();
  t.codes.assign(size_t((n + 1) / 2), 0);
  std::vector<float> absmax(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t from = b * block, to = std::min(n, from + block);
    float m = 0;
    for (int64_t i = from; i < to; ++i) m = std::max(m, std::fabs(w[i]));
    absmax[size_t(b)] = m;
    const float inv = m > 0 ? 1.0f / m : 0.0f;
    for (int64_t i = from; i < to; ++i) {
      const uint8_t q = quant4_encode(format, w[i] * inv);
      t.codes[size_t(i / 2)] |= i % 2 == 0 ? uint8_t(q << 4) : q;
    }
  }
  if (!double_quant) {
    t.absmax = std::move(absmax);
    return t;
  }
  double sum = 0;
  for (float a : absmax) sum += a;
  t.absmax_offset = float(sum / double(blocks));
  const auto map = dynamic_map_signed();
  t.absmax_codes.resize(size_t(blocks));
  for (int64_t g = 0; g * kQuant4AbsmaxBlock < blocks; ++g) {
    const int64_t from = g * kQuant4AbsmaxBlock, to = std::min(blocks, from + kQuant4AbsmaxBlock);
    float m = 0;
    for (int64_t b = from; b < to; ++b) m = std::max(m, std::fabs(absmax[size_t(b)] - t.absmax_offset));
    t.absmax_scale.push_back(m);
    const float inv = m > 0 ? 1.0f / m : 0.0f;
    for (int64_t b = from; b < to; ++b) t.absmax_codes[size_t(b)] = nearest_in(map, (absmax[size_t(b)] - t.absmax_offset) * inv);
  }
  return t;
}

void quant4_dequantize_row(const Quant4Tensor& w, int64_t row, float* out) {
  const auto levels = quant4_levels(w.format);
  const int64_t from = row * w.cols, to = from + w.cols;
  for (int64_t i = from; i < to;) {  // one block's stretch of the row at a time
    const int64_t b = i / w.block, end = std::min(to, (b + 1) * w.block);
    const float scale = w.block_absmax(b);
    float* o = out + (i - from);
    int64_t k = i;
    if (k % 2 == 1) *o++ = levels[w.codes[size_t(k / 2)] & 0x0F] * scale, ++k;
    for (; k + 1 < end; k += 2, o += 2) {
      const uint8_t byte = w.codes[size_t(k / 2)];
      o[0] = levels[byte >> 4] * scale;
      o[1] = levels[byte & 0x0F] * scale;
    }
    if (k < end) *o = levels[w.codes[size_t(k / 2)] >> 4] * scale;
    i = end;
  }
}

void quant4_dequantize(const Quant4Tensor& w, float* out) {
#pragma omp parallel for schedule(static) if (w.rows * w.cols > (1 << 16))
  for (int64_t r = 0; r < w.rows; ++r) quant4_dequantize_row(w, r, out + r * w.cols);
}

void quant4_matmul_xwt(float* y, const float* x, const Quant4Tensor& w, int64_t m, std::vector<float>& scratch) {
  if (m <= 4) {  // decode: each weight row read once, in 4 bits
#pragma omp parallel
    {
      std::vector<float> row(size_t(w.cols));
#pragma omp for schedule(static)
      for (int64_t r = 0; r < w.rows; ++r) {
        quant4_dequantize_row(w, r, row.data());
        for (int64_t i = 0; i < m; ++i) y[i * w.rows + r] = cblas_sdot(int(w.cols), x + i * w.cols, 1, row.data(), 1);
      }
    }
    return;
  }
  scratch.resize(size_t(w.rows * w.cols));
  quant4_dequantize(w, scratch.data());
  matmul_xwt(y, x, scratch.data(), m, w.rows, w.cols);
}

}  // namespace inferlab::kernels::cpu
