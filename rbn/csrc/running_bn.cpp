// RunningBatchNorm's training step on the CPU as one op, and its backward (the derivation is in nbs/07_fast.ipynb).
//
//   rbn::running_bn_train(x, weight, bias, running_mean, running_var, count, num_samples, num_batches_tracked,
//                         num_nonfinite, a, keep, eps, var_floor, warmup_samples, stats_grad) -> y
//
// Forward: per-channel batch moments in one pass around the running mean (two where the batch is far from it), merged
// into the running statistics at weight a (to normalize with) and at weight keep (the buffers, updated in place; a batch
// holding inf/NaN is not merged; a negative count means "taken over from a BatchNorm": this batch sets it), the warm-up
// floor, then y = x*scale + shift in one more pass.
// Backward: BatchNorm's with 1/N replaced by k = r/N (r = the batch's share of the merged statistics, or stats_grad),
// and no variance term in channels whose variance the floor replaced by a constant. With create_graph, the backward
// calls rbn::running_bn_replay_backward, which rbn.fused implements from the readable step: second derivatives.
#include <torch/library.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <cmath>
#include <tuple>
#include <vector>

using at::Tensor;
namespace vec = at::vec;

namespace {

// ---- loading and storing one chunk of K elements of T as NV vectors of the accumulation type A ----
template <typename T> struct Io {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  using V = vec::Vectorized<A>;
  static constexpr bool reduced = vec::is_reduced_floating_point_v<T>;
  static constexpr int NV = reduced ? 2 : 1;
  static constexpr int64_t K = NV * V::size();
  static inline void load(const T* p, V* v) {
    if constexpr (reduced) vec::load_to_float<T>(p, v[0], v[1]); else v[0] = V::loadu(p);
  }
  static inline void store(T* p, const V* v) {
    if constexpr (reduced) vec::convert_from_float<T>(v[0], v[1]).store(p); else v[0].store(p);
  }
};

// ---- "planes": x contiguous as (N, C, L); channel c is N planes of L values ----
// Sums are accumulated in A over blocks of BLOCK vectors, then added into double: the error of a float32 sum grows with
// its length, so no float32 partial sum ever holds more than BLOCK terms per lane.
constexpr int64_t BLOCK = 16;

template <typename V> inline void flush(V& acc, double* lanes) {  // lanes += acc; acc = 0
  typename V::value_type buf[V::size()];
  acc.store(buf);
  for (int j = 0; j < V::size(); ++j) lanes[j] += buf[j];
  acc = V(0);
}

template <typename V> inline double lane_sum(const double* lanes) {
  double s = 0;
  for (int j = 0; j < V::size(); ++j) s += lanes[j];
  return s;
}

template <typename T>  // sum(x - k), sum((x - k)^2) over one plane
inline void plane_moments(const T* p, int64_t L, typename Io<T>::A k, double& s1, double& s2) {
  using IO = Io<T>; using V = typename IO::V; using A = typename IO::A;
  V vk(k), a1(0), a2(0);
  double l1[V::size()] = {}, l2[V::size()] = {};
  int64_t i = 0, b = 0;
  for (; i + IO::K <= L; i += IO::K) {
    V v[IO::NV]; IO::load(p + i, v);
    for (int j = 0; j < IO::NV; ++j) { V d = v[j] - vk; a1 = a1 + d; a2 = vec::fmadd(d, d, a2); }
    if (++b == BLOCK) { flush(a1, l1); flush(a2, l2); b = 0; }
  }
  flush(a1, l1); flush(a2, l2);
  double t1 = lane_sum<V>(l1), t2 = lane_sum<V>(l2);
  for (; i < L; ++i) { double d = double(A(p[i])) - double(k); t1 += d; t2 += d*d; }
  s1 += t1; s2 += t2;
}

template <typename T>  // y = x*sc + sh over one plane
inline void plane_affine(const T* p, T* q, int64_t L, typename Io<T>::A sc, typename Io<T>::A sh) {
  using IO = Io<T>; using V = typename IO::V; using A = typename IO::A;
  V vsc(sc), vsh(sh);
  int64_t i = 0;
  for (; i + IO::K <= L; i += IO::K) {
    V v[IO::NV]; IO::load(p + i, v);
    for (int j = 0; j < IO::NV; ++j) v[j] = vec::fmadd(v[j], vsc, vsh);
    IO::store(q + i, v);
  }
  for (; i < L; ++i) q[i] = T(A(p[i])*sc + sh);
}

template <typename T>  // sum(g), sum(g*(x - m)) over one plane
inline void plane_grad_sums(const T* g, const T* x, int64_t L, typename Io<T>::A m, double& sg, double& sgx) {
  using IO = Io<T>; using V = typename IO::V; using A = typename IO::A;
  V vm(m), a1(0), a2(0);
  double l1[V::size()] = {}, l2[V::size()] = {};
  int64_t i = 0, b = 0;
  for (; i + IO::K <= L; i += IO::K) {
    V vg[IO::NV], vx[IO::NV]; IO::load(g + i, vg); IO::load(x + i, vx);
    for (int j = 0; j < IO::NV; ++j) { a1 = a1 + vg[j]; a2 = vec::fmadd(vg[j], vx[j] - vm, a2); }
    if (++b == BLOCK) { flush(a1, l1); flush(a2, l2); b = 0; }
  }
  flush(a1, l1); flush(a2, l2);
  double t1 = lane_sum<V>(l1), t2 = lane_sum<V>(l2);
  for (; i < L; ++i) { double gi = double(A(g[i])); t1 += gi; t2 += gi*(double(A(x[i])) - double(m)); }
  sg += t1; sgx += t2;
}

template <typename T>  // dx = al*g + be*x + ga over one plane
inline void plane_dx(const T* g, const T* x, T* dx, int64_t L, typename Io<T>::A al, typename Io<T>::A be, typename Io<T>::A ga) {
  using IO = Io<T>; using V = typename IO::V; using A = typename IO::A;
  V val(al), vbe(be), vga(ga);
  int64_t i = 0;
  for (; i + IO::K <= L; i += IO::K) {
    V vg[IO::NV], vx[IO::NV]; IO::load(g + i, vg); IO::load(x + i, vx);
    for (int j = 0; j < IO::NV; ++j) vg[j] = vec::fmadd(val, vg[j], vec::fmadd(vbe, vx[j], vga));
    IO::store(dx + i, vg);
  }
  for (; i < L; ++i) dx[i] = T(al*A(g[i]) + be*A(x[i]) + ga);
}

// ---- "rows": x as (M, C) with C contiguous (channels-last, or (N, C) inputs) ----
// Per-channel sums of f(x) over rows: each thread sums blocks of BLOCK rows in A, one channel vector at a time with the
// sums in registers, then adds the blocks up in double.
template <typename T, typename F>
void rows_sums(int64_t M, int64_t C, std::vector<double>& S1, std::vector<double>& S2, const F& block) {
  using A = typename Io<T>::A;
  const int nt = at::get_num_threads();
  std::vector<double> P1(nt*C, 0.), P2(nt*C, 0.);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384/std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
    const int tid = at::get_thread_num();
    std::vector<A> a1(C), a2(C);
    for (int64_t r0 = b; r0 < e; r0 += BLOCK) {
      block(r0, std::min(e, r0 + BLOCK) - r0, a1.data(), a2.data());
      for (int64_t c = 0; c < C; ++c) { P1[tid*C + c] += a1[c]; P2[tid*C + c] += a2[c]; }
    }
  });
  for (int t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) { S1[c] += P1[t*C + c]; S2[c] += P2[t*C + c]; }
}

template <typename T>  // a1 = sum(x - k), a2 = sum((x - k)^2) over n rows starting at p, per channel
inline void block_moments(const T* p, int64_t n, int64_t C, const typename Io<T>::A* k, typename Io<T>::A* a1, typename Io<T>::A* a2) {
  using IO = Io<T>; using V = typename IO::V; using A = typename IO::A;
  int64_t c = 0;
  for (; c + IO::K <= C; c += IO::K) {
    V s1[IO::NV], s2[IO::NV], vk[IO::NV];
    for (int j = 0; j < IO::NV; ++j) { s1[j] = V(0); s2[j] = V(0); vk[j] = V::loadu(k + c + j*V::size()); }
    for (int64_t r = 0; r < n; ++r) {
      V v[IO::NV]; IO::load(p + r*C + c, v);
      for (int j = 0; j < IO::NV; ++j) { V d = v[j] - vk[j]; s1[j] = s1[j] + d; s2[j] = vec::fmadd(d, d, s2[j]); }
    }
    for (int j = 0; j < IO::NV; ++j) { s1[j].store(a1 + c + j*V::size()); s2[j].store(a2 + c + j*V::size()); }
  }
  for (; c < C; ++c) {
    A t1 = 0, t2 = 0;
    for (int64_t r = 0; r < n; ++r) { A d = A(p[r*C + c]) - k[c]; t1 += d; t2 += d*d; }
    a1[c] = t1; a2[c] = t2;
  }
}

template <typename T>  // a1 = sum(g), a2 = sum(g*(x - m)) over n rows, per channel
inline void block_grad_sums(const T* g, const T* x, int64_t n, int64_t C, const typename Io<T>::A* m, typename Io<T>::A* a1, typename Io<T>::A* a2) {
  using IO = Io<T>; using V = typename IO::V; using A = typename IO::A;
  int64_t c = 0;
  for (; c + IO::K <= C; c += IO::K) {
    V s1[IO::NV], s2[IO::NV], vm[IO::NV];
    for (int j = 0; j < IO::NV; ++j) { s1[j] = V(0); s2[j] = V(0); vm[j] = V::loadu(m + c + j*V::size()); }
    for (int64_t r = 0; r < n; ++r) {
      V vg[IO::NV], vx[IO::NV]; IO::load(g + r*C + c, vg); IO::load(x + r*C + c, vx);
      for (int j = 0; j < IO::NV; ++j) { s1[j] = s1[j] + vg[j]; s2[j] = vec::fmadd(vg[j], vx[j] - vm[j], s2[j]); }
    }
    for (int j = 0; j < IO::NV; ++j) { s1[j].store(a1 + c + j*V::size()); s2[j].store(a2 + c + j*V::size()); }
  }
  for (; c < C; ++c) {
    A t1 = 0, t2 = 0;
    for (int64_t r = 0; r < n; ++r) { A gi = A(g[r*C + c]); t1 += gi; t2 += gi*(A(x[r*C + c]) - m[c]); }
    a1[c] = t1; a2[c] = t2;
  }
}

template <typename T>  // out = u*p + w*q + z per channel, for one row (q may be null: out = u*p + z)
inline void row_axpy(const T* p, const T* q, T* out, int64_t C, const typename Io<T>::A* u, const typename Io<T>::A* w,
                     const typename Io<T>::A* z) {
  using IO = Io<T>; using V = typename IO::V; using A = typename IO::A;
  int64_t c = 0;
  for (; c + IO::K <= C; c += IO::K) {
    V vp[IO::NV], vq[IO::NV]; IO::load(p + c, vp);
    if (q) IO::load(q + c, vq);
    for (int j = 0; j < IO::NV; ++j) {
      const int64_t o = c + j*V::size();
      V acc = V::loadu(z + o);
      if (q) acc = vec::fmadd(V::loadu(w + o), vq[j], acc);
      vp[j] = vec::fmadd(V::loadu(u + o), vp[j], acc);
    }
    IO::store(out + c, vp);
  }
  for (; c < C; ++c) out[c] = T(u[c]*A(p[c]) + (q ? w[c]*A(q[c]) : A(0)) + z[c]);
}

// ---- layout ----
struct Layout { bool rows; int64_t N, C, L, M; };  // planes: (N, C, L); rows: (M, C)

Layout layout_of(const Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), L = C ? x.numel()/(N*C) : 0;
  const bool cl = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                  (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  const bool rows = L == 1 || (!x.is_contiguous() && cl);
  return {rows, N, C, L, N*L};
}

Tensor dense(const Tensor& x) {  // x in a layout the kernels read: contiguous or channels-last
  const bool cl = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                  (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  return (x.is_contiguous() || cl) ? x : x.contiguous();
}

int64_t plane_grain(const Layout& s) { return std::max<int64_t>(1, 32768/std::max<int64_t>(1, s.N*s.L)); }

template <typename S> void store_stat(Tensor& t, const std::vector<double>& v) {
  S* p = t.data_ptr<S>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = S(v[i]);
}

double read_double(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? *t.data_ptr<double>() : double(*t.data_ptr<float>());
}

std::vector<double> read_vec(const std::optional<Tensor>& t0) {  // a (C,) parameter as doubles; empty if absent
  if (!t0 || !t0->defined()) return {};
  const Tensor t = t0->contiguous();
  std::vector<double> v(t.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "read_vec", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) v[i] = double(p[i]);
  });
  return v;
}

Tensor tensor_of(const std::vector<double>& v, const at::TensorOptions& opts) {
  Tensor t = at::empty({int64_t(v.size())}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "tensor_of", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = scalar_t(v[i]);
  });
  return t;
}

// ---- forward: moments, merge, floor, normalize ----
template <typename T>
std::tuple<Tensor, Tensor> forward_cpu(const Tensor& x0, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    Tensor& rmean, Tensor& rvar, Tensor& count, Tensor& num_samples, Tensor& nbt, Tensor& nonfinite,
    double a, double keep, double eps, double var_floor, int64_t warmup_samples, std::optional<double> stats_grad) {
  using A = typename Io<T>::A;
  const Tensor x = dense(x0);
  const Layout s = layout_of(x);
  const int64_t C = s.C;
  const double n = double(s.M);
  const T* xp = x.const_data_ptr<T>();

  // 1. batch moments around a shift: the running mean, or, where the batch mean turns out farther than a standard
  //    deviation from it, a second pass around the batch mean. Then var = S2/n - (S1/n)^2 loses at most one bit.
  const bool f64 = rmean.scalar_type() == at::kDouble;
  std::vector<double> mean(C), var(C), bm(C), bv(C), S1(C, 0.), S2(C, 0.);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = f64 ? rmean.data_ptr<double>()[c] : double(rmean.data_ptr<float>()[c]);
    var[c] = f64 ? rvar.data_ptr<double>()[c] : double(rvar.data_ptr<float>()[c]);
  }
  std::vector<A> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = A(mean[c]);
  auto moments = [&](int64_t c) {             // batch mean and variance of channel c from S1, S2 around shift[c]
    const double m1 = S1[c]/n;
    bm[c] = double(shift[c]) + m1;
    bv[c] = std::max(S2[c]/n - m1*m1, 0.);
    return m1*m1 <= bv[c] || !std::isfinite(bm[c]);   // close enough (or hopeless: inf/NaN in the batch)
  };
  if (s.rows) {
    auto pass = [&] {
      std::fill(S1.begin(), S1.end(), 0.); std::fill(S2.begin(), S2.end(), 0.);
      rows_sums<T>(s.M, C, S1, S2, [&](int64_t r0, int64_t n, A* a1, A* a2) { block_moments<T>(xp + r0*C, n, C, shift.data(), a1, a2); });
    };
    pass();
    bool again = false;
    for (int64_t c = 0; c < C; ++c) if (!moments(c)) { again = true; }
    if (again) {
      for (int64_t c = 0; c < C; ++c) shift[c] = A(bm[c]);
      pass();
      for (int64_t c = 0; c < C; ++c) moments(c);
    }
  } else {
    at::parallel_for(0, C, plane_grain(s), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        for (int64_t i = 0; i < s.N; ++i) plane_moments<T>(xp + (i*C + c)*s.L, s.L, shift[c], S1[c], S2[c]);
        if (moments(c)) continue;
        shift[c] = A(bm[c]); S1[c] = S2[c] = 0.;
        for (int64_t i = 0; i < s.N; ++i) plane_moments<T>(xp + (i*C + c)*s.L, s.L, shift[c], S1[c], S2[c]);
        moments(c);
      }
    });
  }

  // 2. merge into the running statistics (in double), unless a value is inf/NaN. What a replay of this step needs
  //    (second derivatives) is saved beside: the statistics and counters before the step, and the step's options.
  bool merged = true;
  for (int64_t c = 0; c < C; ++c)
    if (!std::isfinite(bm[c]) || !std::isfinite(S2[c])) merged = false;
  const double cnt0 = read_double(count), cnt = cnt0 < 0 ? n : cnt0;   // < 0: taken over from a BatchNorm
  const int64_t seen0 = *num_samples.data_ptr<int64_t>();
  Tensor saved = at::empty({6*C + 7}, x.options().dtype(at::kDouble));
  double* sv = saved.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) { sv[4*C + c] = mean[c]; sv[5*C + c] = var[c]; }
  const double tail[7] = {a, cnt, double(seen0), stats_grad ? *stats_grad : NAN, var_floor, eps, double(warmup_samples)};
  std::copy(tail, tail + 7, sv + 6*C);
  const double r = a*n/((1 - a)*cnt + a*n);                     // the batch's share in the statistics normalized with
  const double total = (1 - keep)*cnt + keep*n, rk = keep*n/total;   // ... and in the statistics kept
  const double rg = merged ? (stats_grad ? *stats_grad : r) : 0.;   // the share the backward uses
  // channel c's (mean, var) with this batch merged in at share w
  auto merge = [&](int64_t c, double w) {
    const double d = bm[c] - mean[c];
    return std::make_pair(mean[c] + w*d, (1 - w)*var[c] + w*bv[c] + w*(1 - w)*d*d);
  };
  std::vector<double> kmean(C), kvar(C);
  if (merged) {
    for (int64_t c = 0; c < C; ++c) {
      std::tie(kmean[c], kvar[c]) = merge(c, rk);
      std::tie(mean[c], var[c]) = merge(c, r);
    }
    if (f64) { store_stat<double>(rmean, kmean); store_stat<double>(rvar, kvar); }
    else { store_stat<float>(rmean, kmean); store_stat<float>(rvar, kvar); }
    if (count.scalar_type() == at::kDouble) *count.data_ptr<double>() = total; else *count.data_ptr<float>() = float(total);
    *num_samples.data_ptr<int64_t>() += s.N;
  } else {
    *nonfinite.data_ptr<int64_t>() += 1;
  }
  *nbt.data_ptr<int64_t>() += 1;
  const bool warm = *num_samples.data_ptr<int64_t>() < warmup_samples;

  // 3. per-channel scale and shift; what the backward needs: mean, invstd, k for the mean term, k for the var term
  std::vector<A> sc(C), sh(C);
  const std::vector<double> w = read_vec(weight), b = read_vec(bias);
  const double* wp = w.empty() ? nullptr : w.data();
  const double* bp = b.empty() ? nullptr : b.data();
  const double k = rg/n;
  for (int64_t c = 0; c < C; ++c) {
    const double v = var[c];
    const bool floored = warm && !(v >= var_floor);          // clamp_min's gradient mask: kept where v >= var_floor
    const double used = warm && v < var_floor ? var_floor : v;
    const double invstd = 1./std::sqrt(used + eps);
    const double scl = wp ? wp[c]*invstd : invstd;
    sc[c] = A(scl);
    sh[c] = A((bp ? bp[c] : 0.) - mean[c]*scl);
    sv[c] = mean[c]; sv[C + c] = invstd; sv[2*C + c] = k; sv[3*C + c] = floored ? 0. : k;
  }

  // 4. y = x*scale + shift
  Tensor y = at::empty_like(x);
  T* yp = y.data_ptr<T>();
  if (s.rows) {
    at::parallel_for(0, s.M, std::max<int64_t>(1, 32768/std::max<int64_t>(C, 1)), [&](int64_t b0, int64_t e0) {
      for (int64_t r0 = b0; r0 < e0; ++r0) row_axpy<T>(xp + r0*C, nullptr, yp + r0*C, C, sc.data(), nullptr, sh.data());
    });
  } else {
    at::parallel_for(0, C, plane_grain(s), [&](int64_t b0, int64_t e0) {
      for (int64_t c = b0; c < e0; ++c)
        for (int64_t i = 0; i < s.N; ++i) plane_affine<T>(xp + (i*C + c)*s.L, yp + (i*C + c)*s.L, s.L, sc[c], sh[c]);
    });
  }
  return {y, saved};
}

void check_forward(const Tensor& x, const std::optional<Tensor>& weight, const Tensor& rmean, const Tensor& rvar,
                   const Tensor& count, const Tensor& num_samples, const Tensor& nbt, const Tensor& nonfinite) {
  TORCH_CHECK(x.dim() >= 2, "running_bn_train: expected an input (N, C, *), got ", x.dim(), " dimensions");
  TORCH_CHECK(x.numel() > 0, "running_bn_train: empty input");
  const int64_t C = x.size(1);
  TORCH_CHECK(rmean.numel() == C && rvar.numel() == C && rmean.is_contiguous() && rvar.is_contiguous(),
              "running_bn_train: running statistics must be contiguous with ", C, " values");
  TORCH_CHECK(rmean.scalar_type() == rvar.scalar_type() && (rmean.scalar_type() == at::kFloat || rmean.scalar_type() == at::kDouble),
              "running_bn_train: running statistics must be float32 or float64");
  TORCH_CHECK(count.scalar_type() == at::kFloat || count.scalar_type() == at::kDouble, "running_bn_train: count must be float32 or float64");
  for (const Tensor* t : {&num_samples, &nbt, &nonfinite})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->numel() == 1, "running_bn_train: counters must be int64 scalars");
  TORCH_CHECK(!weight || !weight->defined() || weight->numel() == C, "running_bn_train: weight must have ", C, " values");
}

std::tuple<Tensor, Tensor> running_bn_forward_cpu(const Tensor& x, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, Tensor& rmean, Tensor& rvar, Tensor& count, Tensor& num_samples, Tensor& nbt,
    Tensor& nonfinite, double a, double keep, double eps, double var_floor, int64_t warmup_samples, std::optional<double> stats_grad) {
  check_forward(x, weight, rmean, rvar, count, num_samples, nbt, nonfinite);
  switch (x.scalar_type()) {
    case at::kFloat: return forward_cpu<float>(x, weight, bias, rmean, rvar, count, num_samples, nbt, nonfinite, a, keep, eps, var_floor, warmup_samples, stats_grad);
    case at::kDouble: return forward_cpu<double>(x, weight, bias, rmean, rvar, count, num_samples, nbt, nonfinite, a, keep, eps, var_floor, warmup_samples, stats_grad);
    case at::kBFloat16: return forward_cpu<at::BFloat16>(x, weight, bias, rmean, rvar, count, num_samples, nbt, nonfinite, a, keep, eps, var_floor, warmup_samples, stats_grad);
    case at::kHalf: return forward_cpu<at::Half>(x, weight, bias, rmean, rvar, count, num_samples, nbt, nonfinite, a, keep, eps, var_floor, warmup_samples, stats_grad);
    default: TORCH_CHECK(false, "running_bn_train: unsupported dtype ", x.scalar_type());
  }
}

std::tuple<Tensor, Tensor> running_bn_forward_meta(const Tensor& x, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, Tensor& rmean, Tensor& rvar, Tensor& count, Tensor& num_samples, Tensor& nbt,
    Tensor& nonfinite, double a, double keep, double eps, double var_floor, int64_t warmup_samples, std::optional<double> stats_grad) {
  return {at::empty_like(dense(x)), at::empty({6*x.size(1) + 7}, x.options().dtype(at::kDouble))};
}

// ---- backward ----
template <typename T>
std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& g0, const Tensor& x0, const std::optional<Tensor>& weight,
                                                const Tensor& saved, std::array<bool, 3> mask) {
  using A = typename Io<T>::A;
  const Tensor x = dense(x0);
  const Tensor g = g0.contiguous(x.suggest_memory_format());
  const Layout s = layout_of(x);
  const int64_t C = s.C;
  const double* sv = saved.const_data_ptr<double>();
  const double* mean = sv; const double* invstd = sv + C; const double* km = sv + 2*C; const double* kv = sv + 3*C;
  const T* xp = x.const_data_ptr<T>(); const T* gp = g.const_data_ptr<T>();
  const std::vector<double> w = read_vec(weight);
  const double* wp = w.empty() ? nullptr : w.data();

  bool need_sums = mask[1] || mask[2];
  for (int64_t c = 0; c < C && !need_sums; ++c) need_sums = km[c] != 0. || kv[c] != 0.;
  std::vector<double> sg(C, 0.), sgx(C, 0.);
  std::vector<A> al(C), be(C), ga(C), mA(C);
  for (int64_t c = 0; c < C; ++c) mA[c] = A(mean[c]);
  auto coefs = [&](int64_t c) {       // dx = al*g + be*x + ga (sgx made exact for the mean rounded to A first)
    const double a0 = wp ? wp[c]*invstd[c] : invstd[c];
    const double b0 = -a0*invstd[c]*invstd[c]*kv[c]*sgx[c];
    al[c] = A(a0); be[c] = A(b0); ga[c] = A(-a0*km[c]*sg[c] - b0*mean[c]);
  };
  Tensor dx = mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  T* dxp = mask[0] ? dx.data_ptr<T>() : nullptr;
  if (s.rows) {
    if (need_sums) {
      rows_sums<T>(s.M, C, sg, sgx, [&](int64_t r0, int64_t n, A* a1, A* a2) { block_grad_sums<T>(gp + r0*C, xp + r0*C, n, C, mA.data(), a1, a2); });
      for (int64_t c = 0; c < C; ++c) sgx[c] += (double(mA[c]) - mean[c])*sg[c];
    }
    if (mask[0]) {
      for (int64_t c = 0; c < C; ++c) coefs(c);
      at::parallel_for(0, s.M, std::max<int64_t>(1, 32768/std::max<int64_t>(C, 1)), [&](int64_t b0, int64_t e0) {
        for (int64_t r = b0; r < e0; ++r) row_axpy<T>(gp + r*C, xp + r*C, dxp + r*C, C, al.data(), be.data(), ga.data());
      });
    }
  } else {
    at::parallel_for(0, C, plane_grain(s), [&](int64_t b0, int64_t e0) {
      for (int64_t c = b0; c < e0; ++c) {
        if (need_sums) {
          for (int64_t i = 0; i < s.N; ++i) plane_grad_sums<T>(gp + (i*C + c)*s.L, xp + (i*C + c)*s.L, s.L, mA[c], sg[c], sgx[c]);
          sgx[c] += (double(mA[c]) - mean[c])*sg[c];   // sum(g*(x - mean)) from the sum around the rounded mean
        }
        if (mask[0]) {
          coefs(c);
          for (int64_t i = 0; i < s.N; ++i)
            plane_dx<T>(gp + (i*C + c)*s.L, xp + (i*C + c)*s.L, dxp + (i*C + c)*s.L, s.L, al[c], be[c], ga[c]);
        }
      }
    });
  }
  const auto popts = x.options().dtype(wp ? weight->scalar_type() : (std::is_same_v<T, double> ? at::kDouble : at::kFloat));
  if (mask[1]) for (int64_t c = 0; c < C; ++c) sgx[c] *= invstd[c];     // dweight = sum(g*xhat)
  return {dx, tensor_of(mask[1] ? sgx : std::vector<double>(), popts), tensor_of(mask[2] ? sg : std::vector<double>(), popts)};
}

std::tuple<Tensor, Tensor, Tensor> running_bn_backward_cpu(const Tensor& g, const Tensor& x, const std::optional<Tensor>& weight,
                                                           const Tensor& saved, std::array<bool, 3> mask) {
  switch (x.scalar_type()) {
    case at::kFloat: return backward_cpu<float>(g, x, weight, saved, mask);
    case at::kDouble: return backward_cpu<double>(g, x, weight, saved, mask);
    case at::kBFloat16: return backward_cpu<at::BFloat16>(g, x, weight, saved, mask);
    case at::kHalf: return backward_cpu<at::Half>(g, x, weight, saved, mask);
    default: TORCH_CHECK(false, "running_bn_backward: unsupported dtype ", x.scalar_type());
  }
}

std::tuple<Tensor, Tensor, Tensor> running_bn_backward_meta(const Tensor& g, const Tensor& x, const std::optional<Tensor>& weight,
                                                            const Tensor& saved, std::array<bool, 3> mask) {
  const int64_t C = x.size(1);
  const auto popts = x.options().dtype(weight && weight->defined() ? weight->scalar_type() : (x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  return {mask[0] ? at::empty_like(dense(x)) : at::empty({0}, x.options()), at::empty({mask[1] ? C : 0}, popts),
          at::empty({mask[2] ? C : 0}, popts)};
}

// ---- autograd: the backward above, in C++ ----
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RunningBNTrain : public torch::autograd::Function<RunningBNTrain> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, Tensor rmean, Tensor rvar, Tensor count, Tensor num_samples,
                        Tensor nbt, Tensor nonfinite, double a, double keep, double eps, double var_floor, int64_t warmup_samples,
                        std::optional<double> stats_grad) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("rbn::running_bn_forward", "")
                         .typed<decltype(running_bn_forward_cpu)>();
    Tensor y, saved;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, saved) = op.call(x, weight, bias, rmean, rvar, count, num_samples, nbt, nonfinite, a, keep, eps, var_floor,
                                   warmup_samples, stats_grad);
    }
    for (Tensor* t : {&rmean, &rvar, &count, &num_samples, &nbt, &nonfinite})
      if (!t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
    ctx->save_for_backward({x, weight ? *weight : Tensor(), saved});
    ctx->saved_data["bias_dtype"] = bias && bias->defined() ? c10::IValue(int64_t(bias->scalar_type())) : c10::IValue();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("rbn::running_bn_backward", "")
                         .typed<decltype(running_bn_backward_cpu)>();
    auto sv = ctx->get_saved_variables();
    const Tensor &x = sv[0], &weight = sv[1], &saved = sv[2];
    variable_list out(15);
    if (!grads[0].defined()) return out;
    const bool has_w = weight.defined(), has_b = !ctx->saved_data["bias_dtype"].isNone();
    std::array<bool, 3> mask = {ctx->needs_input_grad(0), has_w && ctx->needs_input_grad(1), has_b && ctx->needs_input_grad(2)};
    const auto w = has_w ? std::optional<Tensor>(weight) : std::nullopt;
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {      // create_graph: gradients that can be differentiated again, from a replay of the step
      static auto replay = c10::Dispatcher::singleton().findSchemaOrThrow("rbn::running_bn_replay_backward", "")
                               .typed<decltype(running_bn_backward_cpu)>();
      std::tie(dx, dw, db) = replay.call(grads[0], x, w, saved, mask);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dx, dw, db) = op.call(grads[0], x, w, saved, mask);
    }
    if (mask[0]) out[0] = dx;
    if (mask[1]) out[1] = dw;
    if (mask[2]) out[2] = db.to(c10::ScalarType(ctx->saved_data["bias_dtype"].toInt()));
    return out;
  }
};

Tensor running_bn_train_autograd(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    Tensor& rmean, Tensor& rvar, Tensor& count, Tensor& num_samples, Tensor& nbt, Tensor& nonfinite, double a,
    double keep, double eps, double var_floor, int64_t warmup_samples, std::optional<double> stats_grad) {
  return RunningBNTrain::apply(x, weight, bias, rmean, rvar, count, num_samples, nbt, nonfinite, a, keep, eps, var_floor,
                               warmup_samples, stats_grad);
}

Tensor running_bn_train_composite(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    Tensor& rmean, Tensor& rvar, Tensor& count, Tensor& num_samples, Tensor& nbt, Tensor& nonfinite, double a,
    double keep, double eps, double var_floor, int64_t warmup_samples, std::optional<double> stats_grad) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("rbn::running_bn_forward", "")
                       .typed<decltype(running_bn_forward_cpu)>();
  return std::get<0>(op.call(x, weight, bias, rmean, rvar, count, num_samples, nbt, nonfinite, a, keep, eps, var_floor,
                             warmup_samples, stats_grad));
}

}  // namespace

#define RBN_ARGS "Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, Tensor(b!) running_var, " \
  "Tensor(c!) count, Tensor(d!) num_samples, Tensor(e!) num_batches_tracked, Tensor(f!) num_nonfinite, float a, " \
  "float keep, float eps, float var_floor, int warmup_samples, float? stats_grad"

TORCH_LIBRARY(rbn, m) {
  m.def("running_bn_train(" RBN_ARGS ") -> Tensor");
  m.def("running_bn_forward(" RBN_ARGS ") -> (Tensor, Tensor)");
  m.def("running_bn_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor saved, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // the backward as differentiable ops (second derivatives): implemented in Python by rbn.fused, from the readable step
  m.def("running_bn_replay_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor saved, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rbn, CPU, m) {
  m.impl("running_bn_forward", &running_bn_forward_cpu);
  m.impl("running_bn_backward", &running_bn_backward_cpu);
}

TORCH_LIBRARY_IMPL(rbn, Meta, m) {
  m.impl("running_bn_forward", &running_bn_forward_meta);
  m.impl("running_bn_backward", &running_bn_backward_meta);
}

TORCH_LIBRARY_IMPL(rbn, CompositeExplicitAutograd, m) { m.impl("running_bn_train", &running_bn_train_composite); }

TORCH_LIBRARY_IMPL(rbn, Autograd, m) {
  m.impl("running_bn_train", &running_bn_train_autograd);
  m.impl("running_bn_backward", torch::autograd::autogradNotImplementedFallback());   // its derivative: the replay above
}
