#include "cpu/nf4.h"

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

// The index of the nearest level (midpoints decide, as bitsandbytes' decision tree does).
uint8_t nearest_nf4(float x) {
  uint8_t i = 0;
  while (i < 15 && x > (kNf4[i] + kNf4[i + 1]) / 2.0f) ++i;
  return i;
}

uint8_t nearest_in(std::span<const float> map, float x) {
  const auto it = std::lower_bound(map.begin(), map.end(), x);
  if (it == map.begin()) return 0;
  if (it == map.end()) return uint8_t(map.size() - 1);
  const size_t hi = size_t(it - map.begin());
  return uint8_t(x - map[hi - 1] <= map[hi] - x ? hi - 1 : hi);
}

uint8_t code_at(const Nf4Tensor& w, int64_t i) {
  const uint8_t byte = w.codes[size_t(i / 2)];
  return i % 2 == 0 ? uint8_t(byte >> 4) : uint8_t(byte & 0x0F);
}

}  // namespace

std::span<const float> nf4_levels() { return kNf4; }

std::span<const float> dynamic_map_signed() {
  static const std::array<float, 256> map = make_dynamic_map();
  return map;
}

float Nf4Tensor::block_absmax(int64_t b) const {
  if (!double_quant) return absmax[size_t(b)];
  return dynamic_map_signed()[absmax_codes[size_t(b)]] * absmax_scale[size_t(b / kNf4AbsmaxBlock)] + absmax_offset;
}

int64_t Nf4Tensor::bytes() const {
  return int64_t(codes.size() + absmax.size() * 4 + absmax_codes.size() + absmax_scale.size() * 4) +
         (double_quant ? 4 : 0);
}

Nf4Tensor nf4_quantize(const float* w, int64_t rows, int64_t cols, int32_t block, bool double_quant) {
  Nf4Tensor t;
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
      const uint8_t q = nearest_nf4(w[i] * inv);
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
  for (int64_t g = 0; g * kNf4AbsmaxBlock < blocks; ++g) {
    const int64_t from = g * kNf4AbsmaxBlock, to = std::min(blocks, from + kNf4AbsmaxBlock);
    float m = 0;
    for (int64_t b = from; b < to; ++b) m = std::max(m, std::fabs(absmax[size_t(b)] - t.absmax_offset));
    t.absmax_scale.push_back(m);
    const float inv = m > 0 ? 1.0f / m : 0.0f;
    for (int64_t b = from; b < to; ++b) t.absmax_codes[size_t(b)] = nearest_in(map, (absmax[size_t(b)] - t.absmax_offset) * inv);
  }
  return t;
}

void nf4_dequantize_row(const Nf4Tensor& w, int64_t row, float* out) {
  const int64_t from = row * w.cols;
  int64_t b = -1;
  float scale = 0;
  for (int64_t j = 0; j < w.cols; ++j) {
    const int64_t i = from + j;
    if (i / w.block != b) b = i / w.block, scale = w.block_absmax(b);
    out[j] = kNf4[code_at(w, i)] * scale;
  }
}

void nf4_dequantize(const Nf4Tensor& w, float* out) {
#pragma omp parallel for schedule(static) if (w.rows * w.cols > (1 << 16))
  for (int64_t r = 0; r < w.rows; ++r) nf4_dequantize_row(w, r, out + r * w.cols);
}

void nf4_matmul_xwt(float* y, const float* x, const Nf4Tensor& w, int64_t m, std::vector<float>& scratch) {
  if (m <= 4) {  // decode: each weight row read once, in 4 bits
#pragma omp parallel
    {
      std::vector<float> row(size_t(w.cols));
#pragma omp for schedule(static)
      for (int64_t r = 0; r < w.rows; ++r) {
        nf4_dequantize_row(w, r, row.data());
        for (int64_t i = 0; i < m; ++i) y[i * w.rows + r] = cblas_sdot(int(w.cols), x + i * w.cols, 1, row.data(), 1);
      }
    }
    return;
  }
  scratch.resize(size_t(w.rows * w.cols));
  nf4_dequantize(w, scratch.data());
  matmul_xwt(y, x, scratch.data(), m, w.rows, w.cols);
}

}  // namespace inferlab::kernels::cpu
