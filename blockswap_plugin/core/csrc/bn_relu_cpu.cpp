// Batch norm in training mode followed by ReLU, forward and backward, as one
// CPU kernel each, for the Fisher potential of throwaway search candidates.
//
// Eager PyTorch runs batch norm and ReLU as separate kernels and keeps both
// the batch norm input and the ReLU output for the backward pass. Here the
// forward pass reads the input twice (statistics, then normalise and clamp)
// and writes the output once. The backward pass recomputes the ReLU mask from
// the input, so only the input is kept. Running statistics are not updated.
//
// Tensors are channels-last, seen as rows of C channels. Sums are taken per
// fixed chunk of rows in float and then added in double in chunk order, so the
// result does not depend on the number of threads.
#include "ops.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunkRows = 256;

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  uint16_t bits;
  std::memcpy(&bits, p + i, sizeof(bits));
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(c10::BFloat16* p, int64_t i, float v) {
  // Round to nearest even, as c10::BFloat16 does (inputs here are finite).
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  uint16_t half = static_cast<uint16_t>(bits >> 16);
  std::memcpy(p + i, &half, sizeof(half));
}

template <typename T>
void apply_rows(const T* __restrict__ xp, T* __restrict__ yp, int64_t M, int64_t C, const float* __restrict__ scale_c,
                const float* __restrict__ offset_c);

void check_input(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 4, name, " must be N x C x H x W, got ", x.dim(), " dimensions");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              name, " must be float32 or bfloat16, got ", x.scalar_type());
}

// Per-channel sums of f(row, c) over all rows, chunk by chunk.
template <typename RowFn>
void chunked_sums(int64_t rows, int64_t channels, int64_t terms, RowFn row_fn, std::vector<double>& out) {
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  std::vector<float> partial(static_cast<size_t>(chunks * terms * channels), 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* acc = partial.data() + chunk * terms * channels;
      const int64_t stop = std::min(rows, (chunk + 1) * kChunkRows);
      for (int64_t row = chunk * kChunkRows; row < stop; ++row) {
        row_fn(row, acc);
      }
    }
  });
  out.assign(static_cast<size_t>(terms * channels), 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float* acc = partial.data() + chunk * terms * channels;
    for (int64_t i = 0; i < terms * channels; ++i) out[i] += acc[i];
  }
}

template <typename T>
void forward_impl(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps,
                  torch::Tensor& y, torch::Tensor& mean, torch::Tensor& invstd) {
  const int64_t C = x.size(1);
  const int64_t M = x.numel() / C;
  const T* __restrict__ xp = x.data_ptr<T>();
  T* __restrict__ yp = y.data_ptr<T>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* mp = mean.data_ptr<float>();
  float* ip = invstd.data_ptr<float>();

  // Shift by the first row to keep the sum of squares well conditioned.
  std::vector<float> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = load(xp, c);
  const float* __restrict__ k = shift.data();
  std::vector<double> sums;
  chunked_sums(M, C, 2, [&](int64_t row, float* __restrict__ acc) {
    const T* __restrict__ r = xp + row * C;
    for (int64_t c = 0; c < C; ++c) {
      const float v = load(r, c) - k[c];
      acc[c] += v;
      acc[C + c] += v * v;
    }
  }, sums);

  std::vector<float> scale(C), offset(C);
  for (int64_t c = 0; c < C; ++c) {
    const double mu = sums[c] / M;
    const double var = std::max(sums[C + c] / M - mu * mu, 0.0);
    mp[c] = static_cast<float>(mu + k[c]);
    ip[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
    scale[c] = wp[c] * ip[c];
    offset[c] = bp[c] - mp[c] * scale[c];
  }
  apply_rows(xp, yp, M, C, scale.data(), offset.data());
}

// y = max(x * scale + offset, 0) row by row. The forward pass and the
// recomputation in backward passes share it, so both give the same bits.
template <typename T>
void apply_rows(const T* __restrict__ xp, T* __restrict__ yp, int64_t M, int64_t C, const float* __restrict__ scale_c,
                const float* __restrict__ offset_c) {
  at::parallel_for(0, M, kChunkRows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* __restrict__ r = xp + row * C;
      T* __restrict__ o = yp + row * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v = load(r, c) * scale_c[c] + offset_c[c];
        store(o, c, v > 0.f ? v : 0.f);
      }
    }
  });
}

// The same scale and offset as forward_impl computes from mean and invstd.
void affine_terms(const torch::Tensor& mean, const torch::Tensor& invstd, const torch::Tensor& weight,
                  const torch::Tensor& bias, std::vector<float>& scale, std::vector<float>& offset) {
  const int64_t C = mean.numel();
  const float* mp = mean.data_ptr<float>();
  const float* ip = invstd.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  scale.resize(C);
  offset.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = wp[c] * ip[c];
    offset[c] = bp[c] - mp[c] * scale[c];
  }
}

// Per sample and channel, the sum over positions of a * g, in float.
template <typename T>
void fisher_impl(const torch::Tensor& a, const torch::Tensor& g, torch::Tensor& out) {
  const int64_t N = a.size(0);
  const int64_t C = a.size(1);
  const int64_t P = a.numel() / (N * C);
  const T* __restrict__ ap = a.data_ptr<T>();
  const T* __restrict__ gp = g.data_ptr<T>();
  float* __restrict__ op = out.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* __restrict__ acc = op + n * C;
      for (int64_t c = 0; c < C; ++c) acc[c] = 0.f;
      for (int64_t p = 0; p < P; ++p) {
        const T* __restrict__ ar = ap + (n * P + p) * C;
        const T* __restrict__ gr = gp + (n * P + p) * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += load(ar, c) * load(gr, c);
      }
    }
  });
}

template <typename T>
void backward_impl(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& mean,
                   const torch::Tensor& invstd, const torch::Tensor& weight, const torch::Tensor& bias,
                   torch::Tensor& dx) {
  const int64_t C = x.size(1);
  const int64_t M = x.numel() / C;
  const T* __restrict__ xp = x.data_ptr<T>();
  const T* __restrict__ gp = dy.data_ptr<T>();
  T* __restrict__ dp = dx.data_ptr<T>();
  const float* mp = mean.data_ptr<float>();
  const float* ip = invstd.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();

  std::vector<float> scale, offset;
  affine_terms(mean, invstd, weight, bias, scale, offset);
  const float* __restrict__ scale_c = scale.data();
  const float* __restrict__ offset_c = offset.data();
  const float* __restrict__ mu = mp;
  // Sums of the masked gradient g and of g * (x - mean), per channel.
  std::vector<double> sums;
  chunked_sums(M, C, 2, [&](int64_t row, float* __restrict__ acc) {
    const T* __restrict__ r = xp + row * C;
    const T* __restrict__ g = gp + row * C;
    for (int64_t c = 0; c < C; ++c) {
      const float xv = load(r, c);
      const float gv = xv * scale_c[c] + offset_c[c] > 0.f ? load(g, c) : 0.f;
      acc[c] += gv;
      acc[C + c] += gv * (xv - mu[c]);
    }
  }, sums);

  // dx = a * g - d * x + e, with a = w * invstd, d = a * invstd^2 * mean(g * (x - mean)),
  // e = d * mean - a * mean(g).
  std::vector<float> a(C), d(C), e(C);
  for (int64_t c = 0; c < C; ++c) {
    const double is = ip[c];
    const double ac = wp[c] * is;
    const double dc = ac * is * is * (sums[C + c] / M);
    a[c] = static_cast<float>(ac);
    d[c] = static_cast<float>(dc);
    e[c] = static_cast<float>(dc * mp[c] - ac * (sums[c] / M));
  }
  const float* __restrict__ a_c = a.data();
  const float* __restrict__ d_c = d.data();
  const float* __restrict__ e_c = e.data();
  at::parallel_for(0, M, kChunkRows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* __restrict__ r = xp + row * C;
      const T* __restrict__ g = gp + row * C;
      T* __restrict__ o = dp + row * C;
      for (int64_t c = 0; c < C; ++c) {
        const float xv = load(r, c);
        const float gv = xv * scale_c[c] + offset_c[c] > 0.f ? load(g, c) : 0.f;
        store(o, c, a_c[c] * gv - d_c[c] * xv + e_c[c]);
      }
    }
  });
}

}  // namespace

std::vector<torch::Tensor> bn_relu_forward(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, double eps) {
  check_input(x, "input");
  x = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t C = x.size(1);
  TORCH_CHECK(x.numel() > C, "batch norm needs more than one value per channel, got input of shape ", x.sizes());
  weight = weight.to(at::kFloat).contiguous();
  bias = bias.to(at::kFloat).contiguous();
  auto y = torch::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast);
  auto mean = torch::empty({C}, weight.options());
  auto invstd = torch::empty({C}, weight.options());
  if (x.scalar_type() == at::kBFloat16) {
    forward_impl<c10::BFloat16>(x, weight, bias, eps, y, mean, invstd);
  } else {
    forward_impl<float>(x, weight, bias, eps, y, mean, invstd);
  }
  return {y, mean, invstd};
}

torch::Tensor bn_relu_backward(torch::Tensor dy, torch::Tensor x, torch::Tensor mean, torch::Tensor invstd,
                               torch::Tensor weight, torch::Tensor bias) {
  check_input(x, "input");
  x = x.contiguous(at::MemoryFormat::ChannelsLast);
  dy = dy.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  weight = weight.to(at::kFloat).contiguous();
  bias = bias.to(at::kFloat).contiguous();
  auto dx = torch::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast);
  if (x.scalar_type() == at::kBFloat16) {
    backward_impl<c10::BFloat16>(dy, x, mean, invstd, weight, bias, dx);
  } else {
    backward_impl<float>(dy, x, mean, invstd, weight, bias, dx);
  }
  return dx;
}

torch::Tensor bn_relu_apply(torch::Tensor x, torch::Tensor mean, torch::Tensor invstd, torch::Tensor weight,
                            torch::Tensor bias) {
  check_input(x, "input");
  x = x.contiguous(at::MemoryFormat::ChannelsLast);
  weight = weight.to(at::kFloat).contiguous();
  bias = bias.to(at::kFloat).contiguous();
  TORCH_CHECK(mean.numel() == x.size(1) && invstd.numel() == x.size(1), "mean and invstd need one value per channel");
  std::vector<float> scale, offset;
  affine_terms(mean.contiguous(), invstd.contiguous(), weight, bias, scale, offset);
  auto y = torch::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast);
  const int64_t C = x.size(1);
  const int64_t M = x.numel() / C;
  if (x.scalar_type() == at::kBFloat16) {
    apply_rows(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), M, C, scale.data(), offset.data());
  } else {
    apply_rows(x.data_ptr<float>(), y.data_ptr<float>(), M, C, scale.data(), offset.data());
  }
  return y;
}

torch::Tensor fisher_terms(torch::Tensor a, torch::Tensor g) {
  check_input(a, "activation");
  TORCH_CHECK(a.sizes() == g.sizes(), "activation and gradient shapes differ: ", a.sizes(), " and ", g.sizes());
  a = a.contiguous(at::MemoryFormat::ChannelsLast);
  g = g.to(a.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  auto out = torch::empty({a.size(0), a.size(1)}, a.options().dtype(at::kFloat));
  if (a.scalar_type() == at::kBFloat16) {
    fisher_impl<c10::BFloat16>(a, g, out);
  } else {
    fisher_impl<float>(a, g, out);
  }
  return out;
}
