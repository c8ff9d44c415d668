// Quantized-weight kernels (kernels/cpu/quant_matmul.h) against scalar
// references written here: ggml's reference quantizers and dequantizers, and
// the integer block dot products ggml's CPU backend computes.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/half_convert.h"
#include "cpu/quant_matmul.h"

namespace inferlab::kernels::cpu {
namespace test_quant_matmul {

constexpr QuantType kTypes[] = {QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0};

const char* name(QuantType t) { return t == QuantType::Q4_0 ? "Q4_0" : t == QuantType::Q4_1 ? "Q4_1" : "Q8_0"; }

void put_f16(uint8_t* p, float v) {
  const uint16_t h = float_to_f16(v);
  std::memcpy(p, &h, 2);
}
float get_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_float(h);
}

// ---- ggml's quantize_row_*_ref, one block of 32 -------------------------------

void quantize_block(QuantType t, const float* x, uint8_t* b) {
  if (t == QuantType::Q8_0) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127, id = d != 0 ? 1 / d : 0;
    put_f16(b, d);
    for (int j = 0; j < 32; ++j) b[2 + j] = uint8_t(int8_t(std::round(x[j] * id)));
  } else if (t == QuantType::Q4_0) {  // the extreme value maps to -8
    float amax = 0, extreme = 0;
    for (int j = 0; j < 32; ++j)
      if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]), extreme = x[j];
    const float d = extreme / -8, id = d != 0 ? 1 / d : 0;
    put_f16(b, d);
    for (int j = 0; j < 16; ++j) {
      const int q0 = std::min(15, int(int8_t(x[j] * id + 8.5f))), q1 = std::min(15, int(int8_t(x[j + 16] * id + 8.5f)));
      b[2 + j] = uint8_t(q0 | (q1 << 4));
    }
  } else {
    const float lo = *std::min_element(x, x + 32), hi = *std::max_element(x, x + 32);
    const float d = (hi - lo) / 15, id = d != 0 ? 1 / d : 0;
    put_f16(b, d);
    put_f16(b + 2, lo);
    for (int j = 0; j < 16; ++j) {
      const int q0 = std::min(15, int(int8_t((x[j] - lo) * id + 0.5f)));
      const int q1 = std::min(15, int(int8_t((x[j + 16] - lo) * id + 0.5f)));
      b[4 + j] = uint8_t(q0 | (q1 << 4));
    }
  }
}

// Integer values of a weight block, its d, and its m (Q4_1; else 0).
void block_ints(QuantType t, const uint8_t* b, int* q, float& d, float& m) {
  d = get_f16(b);
  m = t == QuantType::Q4_1 ? get_f16(b + 2) : 0.0f;
  for (int j = 0; j < 16; ++j) {
    if (t == QuantType::Q8_0) {
      q[j] = int8_t(b[2 + j]), q[j + 16] = int8_t(b[18 + j]);
    } else {
      const uint8_t v = b[(t == QuantType::Q4_1 ? 4 : 2) + j];
      const int off = t == QuantType::Q4_0 ? 8 : 0;
      q[j] = (v & 15) - off, q[j + 16] = (v >> 4) - off;
    }
  }
}

struct Matrix {
  QuantType type;
  int64_t rows, cols;
  std::vector<float> source;  // what was quantized
  std::vector<uint8_t> data;
  QuantMatrixRef ref() const { return {type, data.data(), rows, cols}; }
  const uint8_t* block(int64_t r, int64_t b) const {
    return data.data() + (r * (cols / 32) + b) * quant_block_bytes(type);
  }
};

std::vector<float> randn(int64_t count, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(count));
  for (float& f : v) f = dist(rng);
  return v;
}

Matrix make_matrix(QuantType t, int64_t rows, int64_t cols, uint32_t seed) {
  Matrix w{t, rows, cols, randn(rows * cols, seed, 0.05f), {}};
  // Q4_1's minimum matters only when rows are off-centre: shift some of them.
  for (int64_t r = 0; r < rows; r += 3)
    for (int64_t j = 0; j < cols; ++j) w.source[size_t(r * cols + j)] += 0.03f;
  w.data.resize(size_t(rows * cols / 32 * quant_block_bytes(t)));
  for (int64_t b = 0; b < rows * cols / 32; ++b) quantize_block(t, &w.source[size_t(b * 32)], &w.data[size_t(b * quant_block_bytes(t))]);
  return w;
}

// The scalar dequantizer: q * d (+ m), one rounding per operation.
std::vector<float> dequantize(const Matrix& w) {
  std::vector<float> out(size_t(w.rows * w.cols));
  int q[32];
  float d, m;
  for (int64_t b = 0; b < w.rows * w.cols / 32; ++b) {
    block_ints(w.type, w.data.data() + b * quant_block_bytes(w.type), q, d, m);
    for (int j = 0; j < 32; ++j) {
      const float p = float(q[j]) * d;  // exact: fused into + m or not, the same bits
      out[size_t(b * 32 + j)] = w.type == QuantType::Q4_1 ? p + m : p;
    }
  }
  return out;
}

// One activation row quantized as ggml's quantize_row_q8_{0,1}_ref: per block
// d = amax / 127, q = roundf(x / d), d and s = d * sum(q) through fp16.
struct QuantRow {
  std::vector<int> q;
  std::vector<float> d, s;
};

QuantRow quantize_row(const float* x, int64_t k) {
  QuantRow row{std::vector<int>(size_t(k)), {}, {}};
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127, id = d != 0 ? 1 / d : 0;
    int sum = 0;
    for (int j = 0; j < 32; ++j) sum += row.q[size_t(b * 32 + j)] = int(std::round(xb[j] * id));
    row.d.push_back(f16_to_float(float_to_f16(d)));
    row.s.push_back(f16_to_float(float_to_f16(d * float(sum))));
  }
  return row;
}

// ggml's integer dot for one output: per block d_w * d_x * sum(q_w * q_x) + m_w * s_x.
// `mag` gets the sum of the terms' magnitudes, the scale of float rounding.
double integer_dot(const Matrix& w, int64_t r, const QuantRow& x, double& mag) {
  double sum = 0;
  mag = 0;
  int qw[32];
  for (int64_t b = 0; b < w.cols / 32; ++b) {
    float dw, mw;
    block_ints(w.type, w.block(r, b), qw, dw, mw);
    int isum = 0;
    for (int j = 0; j < 32; ++j) isum += qw[j] * x.q[size_t(b * 32 + j)];
    const double t1 = double(dw * x.d[size_t(b)]) * isum, t2 = double(mw) * x.s[size_t(b)];
    sum += t1 + t2;
    mag += std::fabs(t1) + std::fabs(t2);
  }
  return sum;
}

std::vector<float> run(const Matrix& w, const std::vector<float>& x, int64_t m) {
  std::vector<float> y(size_t(m * w.rows), NAN);
  QuantScratch scratch;
  quant_matmul_xwt(y.data(), x.data(), w.ref(), m, scratch);
  return y;
}

struct Shape {
  int64_t n, k;
};
constexpr Shape kShapes[] = {{1536, 576}, {576, 1536}, {4099, 576}, {257, 608}};  // the last: 19 blocks a row

TEST(QuantMatmul, DequantizeRowsMatchesScalarDequantizer) {
  EXPECT_EQ(quant_block_bytes(QuantType::Q4_0), 18);
  EXPECT_EQ(quant_block_bytes(QuantType::Q4_1), 20);
  EXPECT_EQ(quant_block_bytes(QuantType::Q8_0), 34);
  for (QuantType t : kTypes) {
    SCOPED_TRACE(name(t));
    const Matrix w = make_matrix(t, 37, 576, 11);
    const std::vector<float> want = dequantize(w);
    std::vector<float> all(want.size(), NAN), part(size_t(7 * w.cols), NAN);
    quant_dequantize_rows(w.ref(), 0, w.rows, all.data());
    quant_dequantize_rows(w.ref(), 29, 7, part.data());
    EXPECT_EQ(0, std::memcmp(all.data(), want.data(), all.size() * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(part.data(), want.data() + 29 * w.cols, part.size() * sizeof(float)));
    // And the quantization itself is sane: within a step of the source values.
    float worst = 0;
    for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(want[i] - w.source[i]));
    EXPECT_LT(worst, t == QuantType::Q8_0 ? 0.003f : 0.05f);
  }
}

TEST(QuantMatmul, IntegerPathMatchesIntegerReference) {
  for (QuantType t : kTypes) {
    for (const Shape& s : kShapes) {
      const Matrix w = make_matrix(t, s.n, s.k, uint32_t(s.n + s.k));
      for (int64_t m : {int64_t(1), int64_t(3), kQuantMatmulMaxIntegerRows}) {
        SCOPED_TRACE(testing::Message() << name(t) << " n=" << s.n << " k=" << s.k << " m=" << m);
        std::vector<float> x = randn(m * s.k, uint32_t(7 * m));
        std::fill(x.begin() + 32, x.begin() + 64, 0.0f);  // a zero block: d = 0
        if (m > 1) std::fill(x.begin() + s.k, x.begin() + 2 * s.k, 0.0f);  // a zero row
        const std::vector<float> y = run(w, x, m);
        int64_t bad = 0;
        for (int64_t i = 0; i < m; ++i) {
          const QuantRow xq = quantize_row(&x[size_t(i * s.k)], s.k);
          for (int64_t r = 0; r < s.n; ++r) {
            double mag;
            const double want = integer_dot(w, r, xq, mag);
            const double got = y[size_t(i * s.n + r)];
            if (!(std::fabs(got - want) <= 1e-5 * mag + 1e-12) && ++bad <= 3)
              ADD_FAILURE() << "y(" << i << "," << r << ") = " << got << ", want " << want;
          }
        }
        EXPECT_EQ(bad, 0);
      }
    }
  }
}

// ggml rounds activations with roundf: halves away from zero, not to even.
TEST(QuantMatmul, ActivationRoundingIsHalfAwayFromZero) {
  // Five Q8_0 rows, every weight 1 with d = 1.
  Matrix w{QuantType::Q8_0, 5, 32, {}, std::vector<uint8_t>(5 * 34, 1)};
  for (int r = 0; r < 5; ++r) put_f16(&w.data[size_t(r * 34)], 1.0f);
  // amax 127 makes d = 1 exactly, so q = round(x).
  std::vector<float> x(32, 0.0f);
  x[0] = 127, x[1] = 2.5f, x[2] = 0.5f, x[3] = 4.5f, x[4] = -1.5f, x[5] = -0.5f;
  const std::vector<float> y = run(w, x, 1);
  for (int r = 0; r < 5; ++r) EXPECT_EQ(y[size_t(r)], 127 + 3 + 1 + 5 - 2 - 1) << r;  // to even: 131
}

// Against the float product with the dequantized weights: the only difference is
// the activations' quantization, bounded per block by amax / 254 per value (rounding)
// plus fp16 rounding of d (amax / 2048) and, for Q4_1, of s.
TEST(QuantMatmul, IntegerPathCloseToFloatProduct) {
  for (QuantType t : kTypes) {
    const Shape s = kShapes[0];
    const Matrix w = make_matrix(t, s.n, s.k, 5);
    const std::vector<float> wf = dequantize(w);
    const int64_t m = 3;
    const std::vector<float> x = randn(m * s.k, 9);
    const std::vector<float> y = run(w, x, m);
    double worst_ratio = 0;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t r = 0; r < s.n; ++r) {
        double exact = 0, bound = 0;
        for (int64_t b = 0; b < s.k / 32; ++b) {
          const float* xb = &x[size_t(i * s.k + b * 32)];
          const float* wb = &wf[size_t(r * s.k + b * 32)];
          float amax = 0, dw, mw;
          for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
          int q[32];
          block_ints(t, w.block(r, b), q, dw, mw);
          for (int j = 0; j < 32; ++j) {
            exact += double(wb[j]) * xb[j];
            bound += std::fabs(wb[j]) * (amax / 254.0 + amax / 2048.0) + 1e-5 * std::fabs(wb[j] * xb[j]);
          }
          bound += std::fabs(mw) * 32 * amax / 1024.0;
        }
        const double err = std::fabs(y[size_t(i * s.n + r)] - exact);
        ASSERT_LE(err, bound) << name(t) << " y(" << i << "," << r << ")";
        worst_ratio = std::max(worst_ratio, err / bound);
      }
    EXPECT_GT(worst_ratio, 0.0) << name(t) << ": quantizing x should change something";
  }
}

TEST(QuantMatmul, LargeBatchMatchesDequantizedProduct) {
  const int64_t m = 40;
  ASSERT_GT(m, kQuantMatmulMaxIntegerRows) << "m must take the dequantize + sgemm path";
  for (QuantType t : kTypes) {
    for (const Shape& s : {kShapes[0], kShapes[2]}) {  // 4099 rows: several chunks, a short last one
      SCOPED_TRACE(testing::Message() << name(t) << " n=" << s.n << " k=" << s.k);
      const Matrix w = make_matrix(t, s.n, s.k, 3);
      const std::vector<float> wf = dequantize(w);
      const std::vector<float> x = randn(m * s.k, 21);
      const std::vector<float> y = run(w, x, m);
      int64_t bad = 0;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t r = 0; r < s.n; ++r) {
          double want = 0, mag = 0;
          for (int64_t j = 0; j < s.k; ++j) {
            const double p = double(wf[size_t(r * s.k + j)]) * x[size_t(i * s.k + j)];
            want += p, mag += std::fabs(p);
          }
          const double got = y[size_t(i * s.n + r)];
          if (!(std::fabs(got - want) <= 1e-4 * mag) && ++bad <= 3)
            ADD_FAILURE() << "y(" << i << "," << r << ") = " << got << ", want " << want;
        }
      EXPECT_EQ(bad, 0);
    }
  }
}

// Each output row is computed by one thread in a fixed order: any thread count
// gives the same bits.
TEST(QuantMatmul, ResultDoesNotDependOnThreadCount) {
  const int saved = omp_get_max_threads();
  for (QuantType t : kTypes) {
    const Matrix w = make_matrix(t, 4099, 576, 13);
    const std::vector<float> x = randn(2 * 576, 17);
    omp_set_num_threads(1);
    const std::vector<float> one = run(w, x, 2);
    omp_set_num_threads(3);
    const std::vector<float> three = run(w, x, 2);
    EXPECT_EQ(0, std::memcmp(one.data(), three.data(), one.size() * sizeof(float))) << name(t);
    EXPECT_TRUE(std::all_of(one.begin(), one.end(), [](float v) { return std::isfinite(v); })) << name(t);
  }
  omp_set_num_threads(saved);
}

}  // namespace test_quant_matmul
}  // namespace inferlab::kernels::cpu
