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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
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

// A channels-last tensor of M rows of C channels is walked in periods: runs of
// r whole rows whose length r * C is a multiple of 32 values and, where C
// allows, at least kMinPeriod values. Per-channel constants are repeated r
// times, so the innermost loops run over a whole period at unit stride and
// vectorise for any C. Loops over the C channels of one row left narrow
// channel counts (8, 16, 24) to scalar code, 5 to 20 times slower, and cost
// loop overhead on every row of 32 channels. The rows after the last whole
// period form one shorter unit.
constexpr int64_t kMinPeriod = 512;
constexpr int64_t kMaxPeriod = 2048;

struct Periods {
  int64_t C = 0;       // channels
  int64_t period = 0;  // elements per whole period (a multiple of C)
  int64_t total = 0;   // elements in all
  int64_t units = 0;   // whole periods, plus one if rows are left over

  Periods(int64_t rows, int64_t channels) : C(channels), total(rows * channels) {
    int64_t rows_per_period = 32 / std::gcd(channels, int64_t{32});
    rows_per_period *= std::max<int64_t>(1, kMinPeriod / (rows_per_period * channels));
    period = channels * rows_per_period <= kMaxPeriod ? channels * rows_per_period : channels;
    units = (total + period - 1) / period;
  }
  int64_t length(int64_t unit) const { return std::min(period, total - unit * period); }
  // Per-channel values repeated over one period.
  std::vector<float> repeat(const float* per_channel) const {
    std::vector<float> out(static_cast<size_t>(period));
    for (int64_t j = 0; j < period; ++j) out[j] = per_channel[j % C];
    return out;
  }
  // Adds one period of values, laid out like repeat's output, to C per-channel sums.
  template <typename Sum>
  void fold(const float* repeated, Sum* per_channel) const {
    for (int64_t start = 0; start < period; start += C) {
      for (int64_t c = 0; c < C; ++c) per_channel[c] += repeated[start + c];
    }
  }
};

// Units per chunk of the sums: about kChunkRows rows.
int64_t chunk_units(const Periods& layout) { return std::max<int64_t>(1, kChunkRows * layout.C / layout.period); }

// Per-channel sums of `terms` quantities. unit_fn(offset, length, acc) adds the
// elements offset .. offset + length - 1 into acc, which contains `terms` blocks
// of one period each (element offset + j goes to position j of each block).
// Sums are taken in float per fixed chunk of units and added in double in
// chunk order, so they do not depend on the number of threads.
template <typename UnitFn>
void period_sums(const Periods& layout, int64_t terms, UnitFn unit_fn, std::vector<double>& out) {
  const int64_t per_chunk = chunk_units(layout);
  const int64_t chunks = (layout.units + per_chunk - 1) / per_chunk;
  const int64_t width = terms * layout.period;
  std::vector<float> partial(static_cast<size_t>(chunks * width), 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* acc = partial.data() + chunk * width;
      const int64_t stop = std::min(layout.units, (chunk + 1) * per_chunk);
      for (int64_t unit = chunk * per_chunk; unit < stop; ++unit) {
        unit_fn(unit * layout.period, layout.length(unit), acc);
      }
    }
  });
  out.assign(static_cast<size_t>(terms * layout.C), 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float* acc = partial.data() + chunk * width;
    for (int64_t t = 0; t < terms; ++t) layout.fold(acc + t * layout.period, out.data() + t * layout.C);
  }
}

// y = max(x * scale + offset, 0), element by element. The forward pass and the
// recomputation in backward passes share it, so both give the same bits.
template <typename T>
void apply_rows(const T* __restrict__ xp, T* __restrict__ yp, int64_t M, int64_t C, const float* __restrict__ scale_c,
                const float* __restrict__ offset_c) {
  const Periods layout(M, C);
  const std::vector<float> scale = layout.repeat(scale_c), offset = layout.repeat(offset_c);
  const float* __restrict__ s = scale.data();
  const float* __restrict__ o = offset.data();
  at::parallel_for(0, layout.units, chunk_units(layout), [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t length = layout.length(unit);
      const T* __restrict__ r = xp + unit * layout.period;
      T* __restrict__ w = yp + unit * layout.period;
      for (int64_t j = 0; j < length; ++j) {
        const float v = load(r, j) * s[j] + o[j];
        store(w, j, v > 0.f ? v : 0.f);
      }
    }
  });
}

void check_input(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 4, name, " must be N x C x H x W, got ", x.dim(), " dimensions");
  TORCH_CHECK(x.numel() > 0, name, " must not be empty, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              name, " must be float32 or bfloat16, got ", x.scalar_type());
}

// Batch statistics: mean and 1 / sqrt(var + eps) per channel.
template <typename T>
void stats_impl(const torch::Tensor& x, double eps, torch::Tensor& mean, torch::Tensor& invstd) {
  const int64_t C = x.size(1);
  const int64_t M = x.numel() / C;
  const T* __restrict__ xp = x.data_ptr<T>();
  float* mp = mean.data_ptr<float>();
  float* ip = invstd.data_ptr<float>();

  // Shift by the first row to keep the sum of squares well conditioned.
  std::vector<float> first(C);
  for (int64_t c = 0; c < C; ++c) first[c] = load(xp, c);
  const Periods layout(M, C);
  const std::vector<float> shift = layout.repeat(first.data());
  const float* __restrict__ k = shift.data();
  const int64_t period = layout.period;
  std::vector<double> sums;
  period_sums(layout, 2, [&](int64_t offset, int64_t length, float* __restrict__ acc) {
    const T* __restrict__ r = xp + offset;
    for (int64_t j = 0; j < length; ++j) {
      const float v = load(r, j) - k[j];
      acc[j] += v;
      acc[period + j] += v * v;
    }
  }, sums);
  for (int64_t c = 0; c < C; ++c) {
    const double mu = sums[c] / M;
    const double var = std::max(sums[C + c] / M - mu * mu, 0.0);
    mp[c] = static_cast<float>(mu + first[c]);
    ip[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
  }
}

// Scale and offset of the normalisation, from the batch statistics and the affine parameters.
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

// Per sample and channel, the sum over positions of a * g, in float. Each
// sample is walked in periods as above, and its last unit may be short.
template <typename T>
void fisher_impl(const torch::Tensor& a, const torch::Tensor& g, torch::Tensor& out) {
  const int64_t N = a.size(0);
  const int64_t C = a.size(1);
  const int64_t per_sample = a.numel() / N;
  const T* __restrict__ ap = a.data_ptr<T>();
  const T* __restrict__ gp = g.data_ptr<T>();
  float* __restrict__ op = out.data_ptr<float>();
  const Periods layout(per_sample / C, C);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(static_cast<size_t>(layout.period));
    float* __restrict__ acc = buffer.data();
    for (int64_t n = begin; n < end; ++n) {
      std::fill(buffer.begin(), buffer.end(), 0.f);
      for (int64_t unit = 0; unit < layout.units; ++unit) {
        const int64_t length = layout.length(unit);
        const T* __restrict__ ar = ap + n * per_sample + unit * layout.period;
        const T* __restrict__ gr = gp + n * per_sample + unit * layout.period;
        for (int64_t j = 0; j < length; ++j) acc[j] += load(ar, j) * load(gr, j);
      }
      float* __restrict__ row = op + n * C;
      for (int64_t c = 0; c < C; ++c) row[c] = 0.f;
      layout.fold(acc, row);
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

  std::vector<float> scale_c, offset_c;
  affine_terms(mean, invstd, weight, bias, scale_c, offset_c);
  const Periods layout(M, C);
  const int64_t period = layout.period;
  const std::vector<float> scale_repeated = layout.repeat(scale_c.data()),
                           offset_repeated = layout.repeat(offset_c.data()), mean_repeated = layout.repeat(mp);
  const float* __restrict__ s = scale_repeated.data();
  const float* __restrict__ o = offset_repeated.data();
  const float* __restrict__ mu = mean_repeated.data();
  // Sums of the masked gradient g and of g * (x - mean), per channel.
  std::vector<double> sums;
  period_sums(layout, 2, [&](int64_t offset, int64_t length, float* __restrict__ acc) {
    const T* __restrict__ r = xp + offset;
    const T* __restrict__ g = gp + offset;
    for (int64_t j = 0; j < length; ++j) {
      const float xv = load(r, j);
      const float gv = xv * s[j] + o[j] > 0.f ? load(g, j) : 0.f;
      acc[j] += gv;
      acc[period + j] += gv * (xv - mu[j]);
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
  const std::vector<float> a_repeated = layout.repeat(a.data()), d_repeated = layout.repeat(d.data()),
                           e_repeated = layout.repeat(e.data());
  const float* __restrict__ coef_a = a_repeated.data();
  const float* __restrict__ coef_d = d_repeated.data();
  const float* __restrict__ coef_e = e_repeated.data();
  at::parallel_for(0, layout.units, chunk_units(layout), [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t length = layout.length(unit);
      const T* __restrict__ r = xp + unit * period;
      const T* __restrict__ g = gp + unit * period;
      T* __restrict__ w = dp + unit * period;
      for (int64_t j = 0; j < length; ++j) {
        const float xv = load(r, j);
        const float gv = xv * s[j] + o[j] > 0.f ? load(g, j) : 0.f;
        store(w, j, coef_a[j] * gv - coef_d[j] * xv + coef_e[j]);
      }
    }
  });
}

}  // namespace

namespace {

torch::Tensor prepare_input(torch::Tensor x) {
  check_input(x, "input");
  x = x.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.numel() > x.size(1), "batch norm needs more than one value per channel, got input of shape ",
              x.sizes());
  return x;
}

std::vector<torch::Tensor> batch_stats(const torch::Tensor& x, double eps) {
  auto options = x.options().dtype(at::kFloat);
  auto mean = torch::empty({x.size(1)}, options);
  auto invstd = torch::empty({x.size(1)}, options);
  if (x.scalar_type() == at::kBFloat16) {
    stats_impl<c10::BFloat16>(x, eps, mean, invstd);
  } else {
    stats_impl<float>(x, eps, mean, invstd);
  }
  return {mean, invstd};
}

}  // namespace

std::vector<torch::Tensor> bn_relu_forward(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, double eps) {
  x = prepare_input(x);
  auto stats = batch_stats(x, eps);
  return {bn_relu_apply(x, stats[0], stats[1], weight, bias), stats[0], stats[1]};
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
