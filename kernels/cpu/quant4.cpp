#include "cpu/quant4.h"

#include <cblas.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

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
    // the start, the rest back from the end, each a fused multiply-add as
    // torch computes it), then the means of neighbours.
    const float step = (1.0f - 0.1f) / float(items - 1);
    auto at = [&](int k) {
      return k < items / 2 ? std::fma(step, float(k), 0.1f) : std::fma(-step, float(items - 1 - k), 1.0f);
    };
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

// bitsandbytes' 4-bit code tables: integers divided by their largest magnitude
// in float32 (FP4: 0, 1/16, 8, 12, 4, 6, 2, 3 over 12, then negated; Int4:
// 7 down to 0, then 0 down to -7, over 7). Code 8 is +0 in both (bitsandbytes
// writes it -0, a Python integer, which is 0).
std::array<float, 16> scaled(const std::array<float, 16>& values, float by) {
  std::array<float, 16> out{};
  for (size_t c = 0; c < 16; ++c) out[c] = values[c] / by;
  return out;
}
const std::array<float, 16> kFp4 = scaled(
    {0.0f, 0.0625f, 8.0f, 12.0f, 4.0f, 6.0f, 2.0f, 3.0f, 0.0f, -0.0625f, -8.0f, -12.0f, -4.0f, -6.0f, -2.0f, -3.0f},
    12.0f);
const std::array<float, 16> kInt4 = scaled(
    {7.0f, 6.0f, 5.0f, 4.0f, 3.0f, 2.0f, 1.0f, 0.0f, 0.0f, -1.0f, -2.0f, -3.0f, -4.0f, -5.0f, -6.0f, -7.0f}, 7.0f);

// A format's encoder: its codes sorted by level (stable: code 0 before 8) and the
// float32 midpoints between neighbours; a value takes the sorted position
// past every midpoint below it (a value on a midpoint takes the lower level).
struct Encoder {
  std::array<uint8_t, 16> code_at{};
  std::array<float, 15> midpoint{};
  explicit Encoder(std::span<const float> levels) {
    for (uint8_t c = 0; c < 16; ++c) code_at[c] = c;
    std::stable_sort(code_at.begin(), code_at.end(), [&](uint8_t x, uint8_t y) { return levels[x] < levels[y]; });
    for (size_t i = 0; i < 15; ++i) midpoint[i] = (levels[code_at[i]] + levels[code_at[i + 1]]) / 2.0f;
  }
  uint8_t encode(float x) const {
    x = std::clamp(x, -1.0f, 1.0f);
    size_t i = 0;
    while (i < 15 && midpoint[i] < x) ++i;
    return code_at[i];
  }
};

const Encoder& encoder(Quant4Format format) {
  static const Encoder nf4(kNf4), fp4(kFp4), int4(kInt4);
  return format == Quant4Format::FP4 ? fp4 : format == Quant4Format::Int4 ? int4 : nf4;
}

// The 8-bit code of v in the dynamic map the way bitsandbytes' CPU library
// finds it (0.50): a 65,536-bin table over [-1, 1], each bin holding the
// entry the bin's left edge is nearest to, so a value within one bin of a
// midpoint can take the other neighbour.
constexpr int kLutSize = 65536;
uint8_t dynamic_code(float v) {
  static const std::array<uint8_t, kLutSize> lut = [] {
    const auto map = dynamic_map_signed();
    std::array<float, 255> mid{};
    for (size_t i = 0; i < mid.size(); ++i) mid[i] = 0.5f * (map[i] + map[i + 1]);
    std::array<uint8_t, kLutSize> t{};
    size_t code = 0;
    for (int i = 0; i < kLutSize; ++i) {
      const float edge = -1.0f + (2.0f * float(i)) / float(kLutSize - 1);
      while (code < mid.size() && mid[code] < edge) ++code;
      t[size_t(i)] = uint8_t(code);
    }
    return t;
  }();
  v = std::clamp(v, -1.0f, 1.0f);
  const float position = (v + 1.0f) * 0.5f * float(kLutSize - 1) + 0.5f;
  return lut[size_t(static_cast<uint16_t>(position))];
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

uint8_t quant4_encode(Quant4Format format, float x) { return encoder(format).encode(x); }

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
  const Encoder& enc = encoder(format);
  // An odd count pads the last byte's low nibble with the code of 0.
  t.codes.assign(size_t((n + 1) / 2), n % 2 == 1 ? enc.encode(0.0f) : uint8_t(0));
  std::vector<float> absmax(static_cast<size_t>(blocks));
  // Blocks in parallel: each reads only its values and writes only its absmax
  // and, its size being even, whole bytes of codes no other block touches, so
  // the result is the serial loop's bit for bit (an odd size would share a
  // byte between neighbours, hence serial). The absmaxes' sum and their double
  // quantization below stay serial.
#pragma omp parallel for schedule(static) if (block % 2 == 0 && n > (1 << 16))
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t from = b * block, to = std::min(n, from + block);
    float m = 0;
    for (int64_t i = from; i < to; ++i) m = std::max(m, std::fabs(w[i]));
    absmax[size_t(b)] = m;
    // As bitsandbytes scales: full blocks times the reciprocal, the last
    // partial block divided (its absmax at least 1e-38 either way).
    const float divisor = std::max(m, 1e-38f), inv = 1.0f / divisor;
    const bool partial = to - from < block;
    for (int64_t i = from; i < to; ++i) {
      const uint8_t q = enc.encode(partial ? w[i] / divisor : w[i] * inv);
      uint8_t& byte = t.codes[size_t(i / 2)];
      byte = i % 2 == 0 ? uint8_t((byte & 0x0F) | (q << 4)) : uint8_t((byte & 0xF0) | q);
    }
  }
  if (double_quant) {
    double sum = 0;
    for (float a : absmax) sum += a;
    quant4_double_quantize(t, absmax, float(sum / double(blocks)));
  } else {
    t.absmax = std::move(absmax);
  }
  return t;
}

void quant4_double_quantize(Quant4Tensor& t, const std::vector<float>& absmax, float offset) {
  const int64_t blocks = int64_t(absmax.size());
  t.double_quant = true;
  t.absmax.clear();
  t.absmax_offset = offset;
  t.absmax_scale.clear();
  t.absmax_codes.assign(size_t(blocks), 0);
  std::vector<float> centred(absmax.size());
  for (size_t b = 0; b < absmax.size(); ++b) centred[b] = absmax[b] - offset;
  for (int64_t g = 0; g * kQuant4AbsmaxBlock < blocks; ++g) {
    const int64_t from = g * kQuant4AbsmaxBlock, to = std::min(blocks, from + kQuant4AbsmaxBlock);
    float m = 0;
    for (int64_t b = from; b < to; ++b) m = std::max(m, std::fabs(centred[size_t(b)]));
    t.absmax_scale.push_back(m);
    if (m == 0) continue;  // codes 0, as bitsandbytes leaves them
    const float inv = 1.0f / m;
    for (int64_t b = from; b < to; ++b) t.absmax_codes[size_t(b)] = dynamic_code(centred[size_t(b)] * inv);
  }
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

#if defined(__AVX2__) && defined(__FMA__)
namespace {

// Decode (m <= 4 rows) with AVX2: 8 codes (4 bytes) become 8 levels by four
// 8-byte loads from a 256-entry table of level pairs (no cross-lane shuffles,
// nothing stored and reloaded), dotted with each input row in two independent
// FMA chains per block stretch, the stretch's sum scaled by its absmax once.
// Needs the block size to be a multiple of 16 and cols of the block size.
using LevelPairs = std::array<std::array<float, 2>, 256>;

const LevelPairs& level_pairs(Quant4Format format) {
  auto make = [](Quant4Format f) {
    const auto levels = quant4_levels(f);
    LevelPairs t{};
    for (size_t byte = 0; byte < 256; ++byte) t[byte] = {levels[byte >> 4], levels[byte & 0x0F]};
    return t;
  };
  static const LevelPairs nf4 = make(Quant4Format::NF4), fp4 = make(Quant4Format::FP4), int4 = make(Quant4Format::Int4);
  return format == Quant4Format::FP4 ? fp4 : format == Quant4Format::Int4 ? int4 : nf4;
}

inline __m256 decode8(const LevelPairs& pairs, const uint8_t* bytes) {
  auto pair = [&](int k) { return reinterpret_cast<const double*>(pairs[bytes[k]].data()); };
  const __m128d lo = _mm_loadh_pd(_mm_load_sd(pair(0)), pair(1));
  const __m128d hi = _mm_loadh_pd(_mm_load_sd(pair(2)), pair(3));
  return _mm256_castpd_ps(_mm256_insertf128_pd(_mm256_castpd128_pd256(lo), hi, 1));
}

float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// M input rows, a compile-time count so the accumulators stay in registers.
template <int M>
void quant4_gemv_avx2(float* y, const float* x, const Quant4Tensor& w) {
  const LevelPairs& pairs = level_pairs(w.format);
  const int64_t block = w.block;
#pragma omp parallel for schedule(static) if (w.rows * w.cols > (1 << 15))
  for (int64_t r = 0; r < w.rows; ++r) {
    __m256 total[M];
    for (int row = 0; row < M; ++row) total[row] = _mm256_setzero_ps();
    const int64_t base = r * w.cols;
    for (int64_t j = 0; j < w.cols; j += block) {
      const uint8_t* bytes = w.codes.data() + (base + j) / 2;
      __m256 a0[M], a1[M];
      for (int row = 0; row < M; ++row) a0[row] = a1[row] = _mm256_setzero_ps();
      for (int64_t k = 0; k < block; k += 16) {
        const __m256 v0 = decode8(pairs, bytes + k / 2), v1 = decode8(pairs, bytes + k / 2 + 4);
        for (int row = 0; row < M; ++row) {
          const float* xr = x + row * w.cols + j + k;
          a0[row] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xr), a0[row]);
          a1[row] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xr + 8), a1[row]);
        }
      }
      const __m256 scale = _mm256_set1_ps(w.block_absmax((base + j) / block));
      for (int row = 0; row < M; ++row) total[row] = _mm256_fmadd_ps(_mm256_add_ps(a0[row], a1[row]), scale, total[row]);
    }
    for (int row = 0; row < M; ++row) y[row * w.rows + r] = horizontal_sum(total[row]);
  }
}

void quant4_gemv_avx2(float* y, const float* x, const Quant4Tensor& w, int64_t m) {
  switch (m) {
    case 1: return quant4_gemv_avx2<1>(y, x, w);
    case 2: return quant4_gemv_avx2<2>(y, x, w);
    case 3: return quant4_gemv_avx2<3>(y, x, w);
    default: return quant4_gemv_avx2<4>(y, x, w);
  }
}

}  // namespace
#endif

void quant4_matmul_xwt(float* y, const float* x, const Quant4Tensor& w, int64_t m, std::vector<float>& scratch) {
#if defined(__AVX2__) && defined(__FMA__)
  if (m <= 4 && w.cols % w.block == 0 && w.block % 16 == 0) {
    quant4_gemv_avx2(y, x, w, m);
    return;
  }
#endif
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
