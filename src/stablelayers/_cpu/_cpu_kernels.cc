// Row kernels for stablelayers on the CPU, called through the XLA FFI.
//
// XLA:CPU compiles jax.nn.softmax to one pass over x, but only for plain arithmetic:
// every compare or select the exact semantics need (masked places exactly 0, rows of -inf,
// rows holding +inf, no NaN from inf - inf) splits that pass into several, each of which
// streams the whole array through memory again. A row kernel needs none of that: a row of
// up to a few thousand floats stays in cache, so the kernel reads x once and writes y once,
// and spends the time it saves on TwoSum and double-precision sums.
//
// Every kernel works on a (rows, n) array row by row; rows are split across XLA's intra-op
// thread pool. Vectors are GCC/Clang vector extensions, so the same source is AVX-512, AVX2,
// SSE2 or NEON code: hatch_build.py compiles it once per instruction set (-mavx512f ...,
// -mavx2 -mfma, -march=x86-64 on x86-64; the compiler's default elsewhere), and the loader
// picks the best build the CPU runs.
//
// Every constant of the arithmetic (polynomial coefficients, log(2) split in two, clamps
// and thresholds) comes from _cpu_coefficients.h, which the build writes from the one
// table, src/stablelayers/_core/coefficients.py; the kernels hold no number of their own
// beyond exact ones (0, 1, 1/2) and float32's bit layout (bias 127, 23 mantissa bits).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

// <>, not "": the build's -I names the folder of the header it has just written, which
// must win over one that an earlier build may have left next to this file.
#include <_cpu_coefficients.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));
typedef uint32_t Uints __attribute__((vector_size(4 * kLanes)));
typedef float Half __attribute__((vector_size(2 * kLanes)));
typedef double Doubles __attribute__((vector_size(4 * kLanes)));

constexpr float kInf = std::numeric_limits<float>::infinity();

inline Floats Splat(float a) { return Floats{} + a; }
inline Floats Load(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, Floats v) { std::memcpy(p, &v, sizeof v); }
// The compute-heavy pass over a row (in cache) fetches the next row from memory meanwhile,
// one 64-byte line per vector; a prefetch past the array's end is harmless.
inline void PrefetchNextRow(const float* p, int64_t n) { __builtin_prefetch(p + n); }
inline Floats Select(Ints mask, Floats a, Floats b) {
  return (Floats)(((Ints)a & mask) | ((Ints)b & ~mask));
}
// The halves of a vector, widened to double, and back. GCC lowers the generic form to
// 128-bit pieces, so AVX-512 gets its one-instruction conversions spelled out.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
inline Doubles Low(Floats v) { return (Doubles)_mm512_cvtps_pd(_mm512_castps512_ps256((__m512)v)); }
inline Doubles High(Floats v) {
  return (Doubles)_mm512_cvtps_pd(
      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd((__m512)v), 1)));
}
inline Floats Join(Doubles lo, Doubles hi) {
  __m256 a = _mm512_cvtpd_ps((__m512d)lo), b = _mm512_cvtpd_ps((__m512d)hi);
  return (Floats)_mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1);
}
#else
inline Doubles Low(Floats v) {
  Half h;
  std::memcpy(&h, &v, sizeof h);
  return __builtin_convertvector(h, Doubles);
}
inline Doubles High(Floats v) {
  Half h;
  std::memcpy(&h, reinterpret_cast<const char*>(&v) + sizeof h, sizeof h);
  return __builtin_convertvector(h, Doubles);
}
inline Floats Join(Doubles lo, Doubles hi) {
  Half halves[2] = {__builtin_convertvector(lo, Half), __builtin_convertvector(hi, Half)};
  Floats v;
  std::memcpy(&v, halves, sizeof v);
  return v;
}
#endif
inline double Sum(Doubles v) {
  double s = 0;
  for (int i = 0; i < kLanes / 2; ++i) s += v[i];
  return s;
}
inline float Max(Floats v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline bool Any(Ints v) {
  for (int i = 0; i < kLanes; ++i)
    if (v[i]) return true;
  return false;
}

// kQ: (exp(r) - 1 - r) / r^2 on |r| <= log(2) / 2 (widened 1%), degree 4, so that
// exp(r) = 1 + (r + r^2 Q(r)) is within 1.1e-8 relative. log(2) = kLn2Hi + kLn2Lo with
// kLn2Hi on 16 bits, so that k * kLn2Hi is exact.

// p * 2^k for integral k in [-200, 0]; 0 below float32's smallest normal, as XLA gives.
inline Floats Scale(Floats p, Floats k) {
#ifdef __AVX512F__
  Floats e = (Floats)_mm512_scalef_ps((__m512)p, (__m512)k);
  return Select(e >= std::numeric_limits<float>::min(), e, Floats{});
#else
  Ints biased = __builtin_convertvector(k, Ints) + 127;
  biased = biased > 0 ? biased : Ints{};
  return p * (Floats)(biased << 23);
#endif
}

// Cody-Waite reduction a = k log(2) + r with k integral and |r| <= log(2) / 2, exact up to
// the rounding of r. Returns k + kRoundShift (1.5 * 2^23), the sum that rounds k, whose low
// mantissa bits hold k (PowerOfTwo reads 2^k from them).
inline Floats ReduceByLn2(Floats a, Floats& k, Floats& r) {
  Floats rounded = a * kLog2E + kRoundShift;
  k = rounded - kRoundShift;
  r = (a - k * kLn2Hi) - k * kLn2Lo;
  return rounded;
}

// expm1(r) = r + r^2 Q(r) for a reduced r, so that exp(r) = 1 + Expm1Reduced(r) rounds once.
inline Floats Expm1Reduced(Floats r) {
  return r + r * (r * (kQ[0] + r * (kQ[1] + r * (kQ[2] + r * (kQ[3] + r * kQ[4])))));
}

// exp(t + err) for t in [kExpFloor, 0] = [-140, 0] and |err| <= ulp(t): the reduction of t, with err added to
// r, exp(r) rounded once, then the exact scaling by 2^k. Within about 0.6 ULP.
inline Floats ExpReduced(Floats t, Floats err) {
  Floats k, r;
  ReduceByLn2(t, k, r);
  return Scale(1.0f + Expm1Reduced(r + err), k);
}

// The rounding error of a - b (Knuth's TwoSum, given the rounded difference).
inline Floats DifferenceError(Floats a, Floats b, Floats difference) {
  Floats b_virtual = a - difference;
  return (a - (difference + b_virtual)) + (b_virtual - b);
}

// Below a row max of kWideShift, exp(x - max) carries the rounding of x - max (TwoSum);
// from it on, every x that exp does not take to 0 lies within a factor of two of the max,
// so x - max is exact (Sterbenz) and only needs clamping.

// exp(x - shift) for x <= shift, within about 0.6 ULP: an error e in the exponent is a
// relative error e in the result, so the rounding of x - shift (up to 2^-18 for a shift of
// a hundred) is recovered exactly and enters the reduced argument.
template <bool kWide>
inline Floats ExpShifted(Floats x, Floats shift) {
  if (kWide) {
    Floats t = x - shift;
    return ExpReduced(t > kExpFloor ? t : Splat(kExpFloor), Floats{});
  }
  // Raising x to shift - kExpShiftMargin keeps x - shift finite and exact for x = -inf and
  // for x far below; exp is 0 there either way.
  Floats floor = shift - kExpShiftMargin;
  x = x > floor ? x : floor;
  Floats t = x - shift;
  return ExpReduced(t, DifferenceError(x, shift, t));
}

// exp(x - shift - rest) for x <= shift and |rest| <= ulp(shift): both subtractions
// exact (TwoSum), as in ExpShifted.
template <bool kWide>
inline Floats ExpShifted2(Floats x, Floats shift, Floats rest) {
  Floats t, err;
  if (kWide) {
    t = x - shift;
    t = t > kExpFloor ? t : Splat(kExpFloor);
    err = Floats{};
  } else {
    Floats floor = shift - kExpShiftMargin;
    x = x > floor ? x : floor;
    t = x - shift;
    err = DifferenceError(x, shift, t);
  }
  Floats u = t - rest;
  return ExpReduced(u, err + DifferenceError(t, rest, u));
}

// Sums floats in double: the sums feed differences that cancel (g_k - sum(g y) at a
// dominant entry), where float accumulation over a few thousand terms costs many ulps.
class Accumulator {
 public:
  void Add(Floats v) {
    lo_ += Low(v);
    hi_ += High(v);
  }
  void AddScalar(double v) { tail_ += v; }
  double Total() const { return Sum(lo_) + Sum(hi_) + tail_; }

 private:
  Doubles lo_{}, hi_{};
  double tail_ = 0;
};

// Splits rows over XLA's intra-op thread pool. The calling thread works too, claiming
// shares like any helper, and then waits only for shares that other threads have already
// started: a helper task still queued behind busy threads (two kernels running side by
// side, each on a pool thread) finds nothing left to claim, so no one ever waits on a task
// that cannot run. The helpers own the counters (a late one may start after the call has
// returned) and touch the caller's stack only after claiming a share.
template <typename F>
void ForEachRow(ffi::ThreadPool& pool, int64_t rows, int64_t n, const F& f) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Below ~64K entries a task costs more than it saves.
  if (rows * n < (int64_t{1} << 16)) threads = 1;
  threads = std::min(threads, rows);
  if (threads <= 1) {
    for (int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
  struct Shares {
    std::atomic<int64_t> next{0};
    std::mutex mutex;
    std::condition_variable finished;
    int64_t done = 0;  // guarded by mutex
  };
  auto shares = std::make_shared<Shares>();
  const int64_t parts = threads;
  auto run_part = [&f, rows, parts](int64_t part) {
    for (int64_t r = rows * part / parts; r < rows * (part + 1) / parts; ++r) f(r);
  };
  // Claims and runs shares until none are left. run_part lives on this stack, so it is
  // only followed after a share is claimed, and the caller waits for every share.
  auto work = [shares, parts](const decltype(run_part)* run) {
    int64_t ran = 0;
    for (int64_t part; (part = shares->next.fetch_add(1)) < parts; ++ran) (*run)(part);
    if (ran > 0) {
      std::lock_guard<std::mutex> lock(shares->mutex);
      shares->done += ran;
      if (shares->done == parts) shares->finished.notify_all();
    }
  };
  for (int64_t helper = 1; helper < threads; ++helper) {
    pool.Schedule([work, run = &run_part] { work(run); });
  }
  work(&run_part);
  std::unique_lock<std::mutex> lock(shares->mutex);
  shares->finished.wait(lock, [&] { return shares->done == parts; });
}

struct RowMax {
  float max;
  bool nan;
};

RowMax ScanRow(const float* x, int64_t n) {
  Floats top = Splat(-kInf);
  Ints nan = Ints{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Floats v = Load(x + i);
    top = v > top ? v : top;
    nan |= v != v;
  }
  RowMax row{Max(top), Any(nan)};
  for (; i < n; ++i) {
    row.max = x[i] > row.max ? x[i] : row.max;
    row.nan |= x[i] != x[i];
  }
  return row;
}

int64_t CountPosInf(const float* x, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += x[i] == kInf;
  return count;
}

// Rows whose max is not finite, or that hold a NaN, are rare and take a scalar path.
bool IsSpecial(const RowMax& row) { return row.nan || !std::isfinite(row.max); }
bool IsWide(float max) { return std::fabs(max) >= kWideShift; }

// Writes e = exp(x - max) into out and returns its sum (>= 1: the max entry has e == 1).
template <bool kWide>
double ExpRow(const float* x, float max, float* out, int64_t n) {
  Floats shift = Splat(max);
  Accumulator total;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    PrefetchNextRow(x + i, n);
    Floats e = ExpShifted<kWide>(Load(x + i), shift);
    Store(out + i, e);
    total.Add(e);
  }
  for (; i < n; ++i) {
    out[i] = ExpShifted<kWide>(Splat(x[i]), shift)[0];
    total.AddScalar(out[i]);
  }
  return total.Total();
}

double ExpRow(const float* x, float max, float* out, int64_t n) {
  return IsWide(max) ? ExpRow<true>(x, max, out, n) : ExpRow<false>(x, max, out, n);
}

// ---------------------------------------------------------------------------------------
// softmax: y = exp(x - m) / sum(exp(x - m)), and the row total (for the dominant flag).
// ---------------------------------------------------------------------------------------

void SoftmaxRow(const float* x, float* y, float* total_out, int64_t n) {
  RowMax row = ScanRow(x, n);
  if (IsSpecial(row)) {
    // A row of only -inf is all 0; a row holding +inf shares the mass among its +inf
    // entries. A row with a NaN is NaN at every entry but its -inf ones (docs/semantics.md;
    // the pure-JAX code applies the same rule).
    float share = row.max == kInf && !row.nan ? 1.0f / CountPosInf(x, n) : 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      if (row.nan) {
        y[i] = x[i] == -kInf ? 0.0f : NAN;
      } else {
        y[i] = x[i] == kInf ? share : 0.0f;
      }
    }
    *total_out = row.nan ? NAN : 1.0f;
    return;
  }
  double total = ExpRow(x, row.max, y, n);
  // 1 / total as a float pair: y = e * r_hi + e * r_lo rounds once, not once for 1 / total
  // and again for the product.
  double inverse = 1.0 / total;
  float r_hi = static_cast<float>(inverse);
  float r_lo = static_cast<float>(inverse - r_hi);
  Floats hi = Splat(r_hi), lo = Splat(r_lo);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Floats e = Load(y + i);
    Store(y + i, e * hi + e * lo);
  }
  for (; i < n; ++i) y[i] = y[i] * r_hi + y[i] * r_lo;
  *total_out = static_cast<float>(total);
}

// dx = y * (g - c1 - c2) with c1 = sum(g y) and, where the row's largest share exceeds
// 1/2, c2 = sum((g - c1) y): c1's rounding error recovered through sum(y) == 1, which the
// dominant entry needs (g_k - c1 cancels there). Entries with y == 0 (masked, -inf or
// underflowed) take no part and get exactly 0, even where g is inf or NaN.
void SoftmaxGradRow(const float* y, const float* g, float* dx, int64_t n) {
  Accumulator c1_sum;
  Floats top = Floats{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Floats yv = Load(y + i);
    c1_sum.Add(Select(yv != 0.0f, Load(g + i), Floats{}) * yv);
    top = yv > top ? yv : top;
  }
  float y_max = Max(top);
  for (; i < n; ++i) {
    if (y[i] != 0.0f) c1_sum.AddScalar(static_cast<double>(g[i]) * y[i]);
    y_max = y[i] > y_max ? y[i] : y_max;
  }
  float c1 = static_cast<float>(c1_sum.Total());
  Floats c1v = Splat(c1);
  float c2 = 0.0f;
  if (y_max > 0.5f) {
    Accumulator c2_sum;
    for (i = 0; i + kLanes <= n; i += kLanes) {
      Floats yv = Load(y + i);
      c2_sum.Add((Select(yv != 0.0f, Load(g + i), c1v) - c1v) * yv);
    }
    for (; i < n; ++i) {
      if (y[i] != 0.0f) c2_sum.AddScalar(static_cast<double>(g[i] - c1) * y[i]);
    }
    c2 = static_cast<float>(c2_sum.Total());
  }
  Floats c2v = Splat(c2);
  for (i = 0; i + kLanes <= n; i += kLanes) {
    PrefetchNextRow(y + i, n);
    PrefetchNextRow(g + i, n);
    Floats yv = Load(y + i);
    Ints live = yv != 0.0f;
    Store(dx + i, Select(live, yv * ((Select(live, Load(g + i), c1v) - c1v) - c2v),
                    Floats{}));
  }
  for (; i < n; ++i) dx[i] = y[i] != 0.0f ? y[i] * ((g[i] - c1) - c2) : 0.0f;
}

// ---------------------------------------------------------------------------------------
// log_softmax: y = (x - m) - lse with lse = log(sum(exp(x - m))), and m and lse per row.
// ---------------------------------------------------------------------------------------

// log(sum e) for a row whose e (written by ExpRow) sum to `total`. From total >= 2 on,
// log(total) loses nothing. Below it the row has one dominant entry with e == 1 and the
// rest is what matters: a confident row's arg-max gets -7.1e-12, not 0.0 (jax.nn's
// 1 + 7.1e-12 rounds to 1). So the entries equal to 1 are counted and the others summed
// on their own, and lse = log1p((ones - 1) + rest).
double LogSumExp(const float* e, double total, int64_t n) {
  if (total >= 2) return std::log(total);
  double ones = 0, rest = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (e[i] == 1.0f) {
      ones += 1;
    } else {
      rest += e[i];
    }
  }
  return std::log1p((ones - 1) + rest);
}

// Writes y = x - m - lse, and m + lse as a float pair (shift, rest), which the backward pass
// keeps: shift = fl(m + lse) and rest = (m + lse) - shift, good to 2^-24 of an ulp of the
// shift, so x - shift - rest is the log-softmax and exp of it the softmax, to float
// precision.
void LogSoftmaxRow(const float* x, float* y, float* shift_out, float* rest_out, int64_t n) {
  RowMax row = ScanRow(x, n);
  if (IsSpecial(row)) {
    // + 0.0f: one +inf entry gets +0, as in the pure-JAX code, not -log(1) = -0.
    float at_inf = row.max == kInf && !row.nan
                       ? -std::log(static_cast<float>(CountPosInf(x, n))) + 0.0f
                       : 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      y[i] = row.nan ? (x[i] == -kInf ? -kInf : NAN) : (x[i] == kInf ? at_inf : -kInf);
    }
    // A NaN rest marks a row the backward pass looks at again (see LogSoftmaxGradRow).
    *shift_out = 0.0f;
    *rest_out = NAN;
    return;
  }
  // y holds e = exp(x - m) until the last pass overwrites it.
  double lse = LogSumExp(y, ExpRow(x, row.max, y, n), n);
  double m = row.max;
  float shift = static_cast<float>(m + lse);
  *shift_out = shift;
  *rest_out = static_cast<float>((m - shift) + lse);  // m - shift is exact in double
  // y = (x - shift) - rest: TwoSum makes x - shift exact, so y is rounded once (to within
  // rest's own 2^-24 of an ulp of the shift). A finite logit keeps a finite log-probability
  // (at least -FLT_MAX, where x - shift overflows and TwoSum gives NaN), so that only -inf
  // marks "no mass", as in the pure-JAX path.
  Floats shift_v = Splat(shift), rest_v = Splat(*rest_out);
  Floats lowest = Splat(-std::numeric_limits<float>::max()), minus_inf = Splat(-kInf);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Floats xv = Load(x + i);
    Floats t = xv - shift_v;
    Floats yv = t + (DifferenceError(xv, shift_v, t) - rest_v);
    Store(y + i, Select(xv != minus_inf, yv > lowest ? yv : lowest, minus_inf));
  }
  for (; i < n; ++i) {
    float t = x[i] - shift;
    float yi = t + (DifferenceError(Splat(x[i]), shift_v, Splat(t))[0] - *rest_out);
    y[i] = x[i] == -kInf ? -kInf : (yi > lowest[0] ? yi : lowest[0]);
  }
}

template <bool kWide>
void LogSoftmaxGradLive(const float* x, float shift, float rest, const float* g, float* dx,
                        int64_t n) {
  Accumulator g_sum;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Floats xv = Load(x + i);
    g_sum.Add(Select(xv != -kInf, Load(g + i), Floats{}));
  }
  for (; i < n; ++i) {
    if (x[i] != -kInf) g_sum.AddScalar(g[i]);
  }
  // sum(g) as a float pair: where g_i - p_i sum(g) cancels, one rounding of the sum would
  // be many ulps of the result.
  double total = g_sum.Total();
  float total_hi = static_cast<float>(total);
  // An infinite or NaN sum has no low part: g - p * sum(g) is then the IEEE result, as in
  // the pure-JAX code (inf - inf would make every entry NaN).
  float total_lo = std::isfinite(total) ? static_cast<float>(total - total_hi) : 0.0f;
  Floats hi = Splat(total_hi), lo = Splat(total_lo);
  Floats shift_v = Splat(shift), rest_v = Splat(rest);
  for (i = 0; i + kLanes <= n; i += kLanes) {
    PrefetchNextRow(x + i, n);
    PrefetchNextRow(g + i, n);
    Floats xv = Load(x + i);
    Floats p = ExpShifted2<kWide>(xv, shift_v, rest_v);
    Ints live = xv != -kInf;
    Floats gv = Select(live, Load(g + i), Floats{});
    Store(dx + i, Select(live, (gv - p * hi) - p * lo, Floats{}));
  }
  for (; i < n; ++i) {
    float p = ExpShifted2<kWide>(Splat(x[i]), shift_v, rest_v)[0];
    dx[i] = x[i] != -kInf ? (g[i] - p * hi[0]) - p * lo[0] : 0.0f;
  }
}

// dx = g - softmax(x) * sum(g), with softmax(x) = exp(x - shift - rest) rebuilt from x and
// the forward pass's shift (TwoSum again, so large logits lose nothing). -inf logits
// neither take nor give gradient.
void LogSoftmaxGradRow(const float* x, float shift, float rest, const float* g, float* dx,
                       int64_t n) {
  if (std::isnan(rest)) {
    // A row the forward pass did not normalise: NaN stays NaN, -inf entries are constants,
    // and in a row holding +inf those entries share the mass equally.
    RowMax row = ScanRow(x, n);
    double g_total = 0;
    for (int64_t i = 0; i < n; ++i) g_total += x[i] == kInf ? g[i] : 0.0f;
    float share = row.nan ? NAN : 1.0f / std::max<int64_t>(1, CountPosInf(x, n));
    for (int64_t i = 0; i < n; ++i) {
      bool live = row.nan ? x[i] != -kInf : x[i] == kInf;
      dx[i] = live ? (row.nan ? NAN : g[i] - share * static_cast<float>(g_total)) : 0.0f;
    }
    return;
  }
  if (IsWide(shift)) {
    LogSoftmaxGradLive<true>(x, shift, rest, g, dx, n);
  } else {
    LogSoftmaxGradLive<false>(x, shift, rest, g, dx, n);
  }
}

// ---------------------------------------------------------------------------------------
// softplus: y = log1p(exp(beta x)) / beta, and its derivative sigmoid(beta x) from y.
// Softplus is the pure-JAX path's float32 algorithm (_softplus_float32 in _softplus.py,
// whose comments derive it). The derivative is not: -expm1(-v) takes one Cody-Waite
// reduction here (NegExpm1), where the pure-JAX path switches between a Taylor polynomial
// and 1 - exp(-v) at log(2) (neg_expm1 in _core/arithmetic.py). The coefficients (kLog1pQ,
// kNearZero, kLog2Hi, kLog2Lo, kExpm1Q: see _core/coefficients.py) come from the header.
// ---------------------------------------------------------------------------------------

template <int N>
inline Floats Horner(const float (&c)[N], Floats z) {
  Floats r = Splat(c[N - 1]);
  for (int i = N - 2; i >= 0; --i) r = r * z + c[i];
  return r;
}

// kExpm1Q is (expm1(r) - r) / r^2 again, to degree 6 (max error 1.7e-9): the derivative
// needs expm1 to its own relative precision where it is small, which kQ (made for exp,
// 6.9e-8) does not give.

// 2^k for integral k in [-127, 127], from ReduceByLn2's k + 0x1.8p23: the shift moves k
// from the low mantissa bits into the exponent field (the sum's own exponent bits fall off
// the top). k = -127 gives +0, as XLA's flush would.
inline Floats PowerOfTwo(Floats rounded_k) {
  return (Floats)(((Uints)rounded_k << 23) + (127u << 23));
}

// (t, t_lo) with t + t_lo = exp(a) to about 2^-30 relative, for a <= 0 (NaN passes the
// clamp, so it reaches both): Cody-Waite, then 1 + p split into its rounded sum and the
// exact error (Fast2Sum), both scaled by 2^k.
inline void ExpPair(Floats a, Floats& t, Floats& t_lo) {
  a = a < kExpPairFloor ? Splat(kExpPairFloor) : a;
  Floats k, r;
  Floats scale = PowerOfTwo(ReduceByLn2(a, k, r));  // 0 from k = -127 on
  Floats p = Expm1Reduced(r);
  Floats sum = 1.0f + p;
  t = sum * scale;
  t_lo = ((1.0f - sum) + p) * scale;
}

// Both forms are evaluated in every lane and one is kept, so the other may be anything
// there (u * u overflows far from 0; that lane keeps `far`). A NaN u reaches `far` through
// ExpPair and is kept, since NaN > -1 is false.
inline Floats Softplus(Floats u) {
  Floats minus_abs = (Floats)((Uints)u | 0x80000000u);
  Floats t, t_lo;
  ExpPair(minus_abs, t, t_lo);
  Floats log1p_t = t + ((t_lo - t_lo * t) + t * (t * Horner(kLog1pQ, t)));
  Floats far = (u > 0.0f ? u : Floats{}) + log1p_t;
  Floats s = u * u;
  Floats near = kLog2Hi + (0.5f * u + (s * Horner(kNearZero, s) + kLog2Lo));
  return minus_abs > -kNearZeroBound ? near : far;
}

// -expm1(-v) = sigmoid(u) for v = softplus(u) >= 0, in one Cody-Waite reduction:
// -v = k log(2) + r and expm1(r) = r + r^2 Q(r), so
// -expm1(-v) = (1 - 2^k) - 2^k r - 2^k r^2 Q(r). 1 - 2^k and 2^k r are exact; their
// difference is made exact with TwoSum, so only the last addition rounds. For k = 0
// (v < log(2) / 2) that is -r - r^2 Q(r), with no cancellation: small derivatives keep
// their relative accuracy.
inline Floats NegExpm1(Floats v) {
  Floats a = -v;
  a = a > kExpFloor ? a : Splat(kExpFloor);
  Floats k, r;
  ReduceByLn2(a, k, r);
  Floats q = Horner(kExpm1Q, r);
  Floats scale = Scale(Splat(1.0f), k);
  Floats one_minus = 1.0f - scale, scaled_r = scale * r;
  Floats head = one_minus - scaled_r;
  Floats tail = DifferenceError(one_minus, scaled_r, head) - scale * (r * (r * q));
  return Select(v != v, v, head + tail);
}

// Splits a flat array into chunks over the thread pool, as ForEachRow does rows.
template <typename F>
void ForEachChunk(ffi::ThreadPool& pool, int64_t count, const F& f) {
  constexpr int64_t kChunk = 16384;
  int64_t chunks = (count + kChunk - 1) / kChunk;
  ForEachRow(pool, chunks, kChunk, [&](int64_t c) {
    f(c * kChunk, std::min(count, (c + 1) * kChunk));
  });
}

template <bool kUnitBeta>
void SoftplusRangeWithBeta(const float* x, float* y, float beta, int64_t begin, int64_t end) {
  Floats b = Splat(beta);
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    Floats xs = Load(x + i);
    if (kUnitBeta) {
      Store(y + i, Softplus(xs));
    } else {
      // Where beta * x overflows, softplus(beta * x) / beta is x itself.
      Floats u = b * xs;
      Store(y + i, Select(u == kInf, xs, Softplus(u) / b));
    }
  }
  for (; i < end; ++i) {
    float u = beta * x[i];
    float v = Softplus(Splat(u))[0];
    y[i] = kUnitBeta ? v : (u == kInf ? x[i] : v / beta);
  }
}

void SoftplusRange(const float* x, float* y, float beta, int64_t begin, int64_t end) {
  if (beta == 1.0f) {
    SoftplusRangeWithBeta<true>(x, y, beta, begin, end);
  } else {
    SoftplusRangeWithBeta<false>(x, y, beta, begin, end);
  }
}

void SoftplusGradRange(const float* y, const float* g, float* dx, float beta, int64_t begin,
                       int64_t end) {
  Floats b = Splat(beta);
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    Store(dx + i, Load(g + i) * NegExpm1(b * Load(y + i)));
  }
  for (; i < end; ++i) dx[i] = g[i] * NegExpm1(Splat(beta * y[i]))[0];
}

// ---------------------------------------------------------------------------------------
// FFI handlers. Arrays are (rows, n) row-major; per-row values are (rows,).
// ---------------------------------------------------------------------------------------


// The callers pass 2-D arrays; a batch dimension from vmap only adds rows.
template <ffi::DataType T>
int64_t Cols(const ffi::Buffer<T>& x) {
  return x.dimensions().size() == 0 ? 1 : x.dimensions().back();
}

template <ffi::DataType T>
int64_t Rows(const ffi::Buffer<T>& x) {
  int64_t n = Cols(x);
  return n == 0 ? 0 : static_cast<int64_t>(x.element_count()) / n;
}

ffi::Error Softmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> total) {
  int64_t n = Cols(x);
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  float* tp = total->typed_data();
  ForEachRow(pool, Rows(x), n, [=](int64_t r) { SoftmaxRow(xp + r * n, yp + r * n, tp + r, n); });
  return ffi::Error::Success();
}

ffi::Error SoftmaxGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> g,
                       ffi::ResultBuffer<ffi::F32> dx) {
  int64_t n = Cols(y);
  const float* yp = y.typed_data();
  const float* gp = g.typed_data();
  float* dp = dx->typed_data();
  ForEachRow(pool, Rows(y), n,
             [=](int64_t r) { SoftmaxGradRow(yp + r * n, gp + r * n, dp + r * n, n); });
  return ffi::Error::Success();
}

ffi::Error LogSoftmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> shift,
                      ffi::ResultBuffer<ffi::F32> rest) {
  int64_t n = Cols(x);
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  float* sp = shift->typed_data();
  float* rp = rest->typed_data();
  ForEachRow(pool, Rows(x), n,
             [=](int64_t r) { LogSoftmaxRow(xp + r * n, yp + r * n, sp + r, rp + r, n); });
  return ffi::Error::Success();
}

ffi::Error LogSoftmaxGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> rest,
                          ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx) {
  int64_t n = Cols(x);
  const float* xp = x.typed_data();
  const float* sp = shift.typed_data();
  const float* rp = rest.typed_data();
  const float* gp = g.typed_data();
  float* dp = dx->typed_data();
  ForEachRow(pool, Rows(x), n, [=](int64_t r) {
    LogSoftmaxGradRow(xp + r * n, sp[r], rp[r], gp + r * n, dp + r * n, n);
  });
  return ffi::Error::Success();
}

ffi::Error SoftplusHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::ResultBuffer<ffi::F32> y, float beta) {
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  ForEachChunk(pool, static_cast<int64_t>(x.element_count()),
               [=](int64_t a, int64_t b) { SoftplusRange(xp, yp, beta, a, b); });
  return ffi::Error::Success();
}

ffi::Error SoftplusGradHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y,
                               ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx,
                               float beta) {
  const float* yp = y.typed_data();
  const float* gp = g.typed_data();
  float* dp = dx->typed_data();
  ForEachChunk(pool, static_cast<int64_t>(y.element_count()),
               [=](int64_t a, int64_t b) { SoftplusGradRange(yp, gp, dp, beta, a, b); });
  return ffi::Error::Success();
}

}  // namespace

// Every handler takes XLA's CPU thread pool, then its buffers (and attributes).
inline auto BindOnPool() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(); }
using F32 = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(StablelayersSoftmaxF32, Softmax,
    BindOnPool().Arg<F32>().Ret<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(StablelayersSoftmaxGradF32, SoftmaxGrad,
    BindOnPool().Arg<F32>().Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(StablelayersLogSoftmaxF32, LogSoftmax,
    BindOnPool().Arg<F32>().Ret<F32>().Ret<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(StablelayersLogSoftmaxGradF32, LogSoftmaxGrad,
    BindOnPool().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(StablelayersSoftplusF32, SoftplusHandler,
    BindOnPool().Arg<F32>().Ret<F32>().Attr<float>("beta"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(StablelayersSoftplusGradF32, SoftplusGradHandler,
    BindOnPool().Arg<F32>().Arg<F32>().Ret<F32>().Attr<float>("beta"));
