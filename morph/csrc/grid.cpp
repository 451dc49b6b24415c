// morph native kernels: a tiled template-mixed weight and its gradients in one pass each.
//
// The weight W is viewed as [R, o, C, n]: R x C tiles, each [o, n] with n = in_channels * kernel
// elements. Tile t = (i, j), row-major, is W[i, :, j, :] and mixes the K templates of bank
// tile_banks[t] (each bank is [K, o, n], contiguous) with its coefficient row alpha[t, :]:
//
//     W_t = sum_k alpha[t, k] * T_k                                   (forward)
//     dT_k = sum_{t in tiles of the bank} alpha[t, k] * dW_t           (backward, per bank)
//     dalpha[t, k] = <dW_t, T_k>                                       (backward)
//
// On CPU this is memory-bound, so each kernel makes one pass over its operands: the forward reads
// every template once and writes W once; the backward reads dW and the templates once and writes
// each template gradient once, with streaming stores where the rows are aligned for them (the
// optimizer reads those gradients only after the whole backward, so caching them is wasted traffic).
// The inner loops are written so that the compiler vectorizes them (`omp simd` across independent
// lanes): before that, the backward ran at a third of the memory bandwidth, compute-bound.
// Rows are split over threads with at::parallel_for; the dot products are accumulated in blocks
// (8 lanes in the input dtype, then acc_type: double for float) and per tile row, then summed over
// rows in a fixed order, so results do not depend on the number of threads. Elementwise sums follow
// the order of morph.templates._mix_into (first term a product, then one multiply-add per term; built
// with -ffp-contract=off), so a tile is bit-identical whether generated alone or inside a grid.
//
// Registered as the ops morph::grid (with its autograd in C++) and morph::grid_backward. The reference is
// morph.templates.grid_reference; morph.templates._Grid is the PyTorch fallback on CPU.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kBlock = 2048;  // elements per inner block: a few blocks of each operand stay in L1

struct Layout {
  int64_t R, C, o, n, K;
};

Layout check_inputs(const at::Tensor& coef, at::TensorList banks, int64_t R, int64_t C,
                    const std::vector<int64_t>& tile_banks) {
  TORCH_CHECK(!banks.empty(), "morph grid: no template banks");
  TORCH_CHECK(R > 0 && C > 0, "morph grid: bad grid ", R, "x", C);
  const auto& b0 = banks[0];
  TORCH_CHECK(b0.dim() >= 3, "morph grid: a bank must be [K, out, in, ...], got ", b0.sizes());
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == R * C && coef.size(1) == b0.size(0),
              "morph grid: coefficients ", coef.sizes(), " do not match ", R, "x", C, " tiles of K=", b0.size(0));
  TORCH_CHECK(static_cast<int64_t>(tile_banks.size()) == R * C, "morph grid: tile_banks has ",
              tile_banks.size(), " entries for ", R * C, " tiles");
  for (const auto& b : banks) {
    TORCH_CHECK(b.sizes() == b0.sizes() && b.scalar_type() == b0.scalar_type() && b.device().is_cpu(),
                "morph grid: banks must be CPU tensors of one shape and dtype");
  }
  TORCH_CHECK(coef.scalar_type() == b0.scalar_type() && coef.device().is_cpu(),
              "morph grid: coefficients must be a CPU tensor of the banks' dtype");
  for (auto tb : tile_banks) {
    TORCH_CHECK(tb >= 0 && tb < static_cast<int64_t>(banks.size()), "morph grid: bad bank index ", tb);
  }
  int64_t n = 1;  // elements of one tile row: in_channels * kernel elements
  for (int64_t d = 2; d < b0.dim(); ++d) n *= b0.size(d);
  return {R, C, b0.size(1), n, b0.size(0)};
}

int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_elems));
}

// ---- one row of one bank, for the common small K (templates) and M (tiles that mix the bank) -----
// Every element is loaded once: the M tile rows and K template rows are read, and the M generated
// rows (forward) or the K template-gradient rows (backward) written, in the same loop. Dot products
// go to kVec lanes per (tile, template) so that the compiler vectorizes the loop with M*K
// independent accumulators; they are summed in acc_type per block.
constexpr int kVec = 8;
constexpr int kMaxK = 4, kMaxM = 2;

template <typename scalar_t, int K, int M>
void mix_row(scalar_t* const* dst, const scalar_t* tpl, int64_t plane, const scalar_t* alpha, int64_t n) {
  scalar_t a[M][K];
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) a[m][k] = alpha[m * K + k];
  const scalar_t* tp[K];
  scalar_t* dp[M];
  for (int k = 0; k < K; ++k) tp[k] = tpl + k * plane;
  for (int m = 0; m < M; ++m) dp[m] = dst[m];
  // elements are independent (outputs never alias the templates): vectorize across them
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    scalar_t t[K];
    for (int k = 0; k < K; ++k) t[k] = tp[k][e];
    for (int m = 0; m < M; ++m) {
      scalar_t s = t[0] * a[m][0];
      for (int k = 1; k < K; ++k) s = s + t[k] * a[m][k];
      dp[m][e] = s;
    }
  }
}

// Store kVec lanes at dst: with non-temporal (streaming) stores where the CPU has them and dst is
// aligned for them, else plainly. Streaming stores skip the read-for-ownership of the destination line,
// a third of the traffic of a write-once output; callers fence with store_fence() before returning.
template <typename scalar_t>
inline bool streamable(const scalar_t* dst) {
#if defined(__AVX__)
  return (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) &&
         reinterpret_cast<std::uintptr_t>(dst) % 32 == 0;
#else
  (void)dst;
  return false;
#endif
}

template <typename scalar_t>
inline void store_lanes(scalar_t* dst, const scalar_t* src, bool stream) {
#if defined(__AVX__)
  if (stream) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      static_assert(kVec == 8, "one 256-bit vector of floats");
      _mm256_stream_ps(dst, _mm256_loadu_ps(src));
      return;
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      _mm256_stream_pd(dst, _mm256_loadu_pd(src));
      _mm256_stream_pd(dst + 4, _mm256_loadu_pd(src + 4));
      return;
    }
  }
#endif
  (void)stream;
  for (int l = 0; l < kVec; ++l) dst[l] = src[l];
}

inline void store_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// One element of dT_k = sum_m a[m][k] * dW_m, in the order of morph.templates._mix_into (a product,
// then one add per further tile), shared by the vector loop and its tail so both give the same bits.
template <typename scalar_t, int K, int M>
inline scalar_t template_grad(const scalar_t (&gv)[M], const scalar_t (&a)[M][K], int k) {
  scalar_t s = gv[0] * a[0][k];
  for (int m = 1; m < M; ++m) s = s + gv[m] * a[m][k];
  return s;
}

template <typename scalar_t, typename acc_t, int K, int M, bool kDots, bool kGrad>
void grad_row_impl(const scalar_t* const* g, const scalar_t* tpl, int64_t plane, const scalar_t* alpha, scalar_t* db,
                   int64_t n, acc_t* dots) {
  scalar_t a[M][K];
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) a[m][k] = alpha[m * K + k];
  const scalar_t* gp[M];
  const scalar_t* tp[K];
  scalar_t* dp[K];
  for (int m = 0; m < M; ++m) gp[m] = g[m];
  for (int k = 0; k < K; ++k) {
    tp[k] = tpl + k * plane;
    dp[k] = kGrad ? db + k * plane : nullptr;
  }
  // the template gradients are read again only by the optimizer, after the whole backward: write them
  // around the cache (no read-for-ownership) where the rows are aligned for it
  bool stream = kGrad;
  for (int k = 0; k < K; ++k) stream = stream && streamable(dp[k]);
  for (int64_t e0 = 0; e0 < n; e0 += kBlock) {
    const int64_t e1 = std::min(n, e0 + kBlock);
    scalar_t lanes[M][K][kVec] = {};
    acc_t tail[M][K] = {};
    int64_t e = e0;
    for (; e + kVec <= e1; e += kVec) {
      scalar_t out[K][kVec];
      // the lanes are independent (their own accumulators and outputs): vectorize across them
#pragma omp simd
      for (int l = 0; l < kVec; ++l) {
        scalar_t gv[M], tv[K];
        for (int m = 0; m < M; ++m) gv[m] = gp[m][e + l];
        if constexpr (kDots) {
          for (int k = 0; k < K; ++k) tv[k] = tp[k][e + l];
          for (int m = 0; m < M; ++m)
            for (int k = 0; k < K; ++k) lanes[m][k][l] += gv[m] * tv[k];
        }
        if constexpr (kGrad) {
          for (int k = 0; k < K; ++k) out[k][l] = template_grad<scalar_t, K, M>(gv, a, k);
        }
      }
      if constexpr (kGrad) {
        for (int k = 0; k < K; ++k) store_lanes(dp[k] + e, out[k], stream);
      }
    }
    for (; e < e1; ++e) {
      scalar_t gv[M];
      for (int m = 0; m < M; ++m) gv[m] = gp[m][e];
      if constexpr (kDots) {
        for (int m = 0; m < M; ++m)
          for (int k = 0; k < K; ++k) tail[m][k] += static_cast<acc_t>(gv[m]) * static_cast<acc_t>(tp[k][e]);
      }
      if constexpr (kGrad) {
        for (int k = 0; k < K; ++k) dp[k][e] = template_grad<scalar_t, K, M>(gv, a, k);
      }
    }
    if constexpr (kDots) {
      for (int m = 0; m < M; ++m)
        for (int k = 0; k < K; ++k) {
          acc_t s = tail[m][k];
          for (int l = 0; l < kVec; ++l) s += static_cast<acc_t>(lanes[m][k][l]);
          dots[m * K + k] += s;
        }
    }
  }
}

template <typename scalar_t, typename acc_t, int K, int M>
void grad_row(const scalar_t* const* g, const scalar_t* tpl, int64_t plane, const scalar_t* alpha, scalar_t* db,
              int64_t n, acc_t* dots /* [M][K], accumulated into; nullptr: not needed */) {
  if (dots && db) return grad_row_impl<scalar_t, acc_t, K, M, true, true>(g, tpl, plane, alpha, db, n, dots);
  if (dots) return grad_row_impl<scalar_t, acc_t, K, M, true, false>(g, tpl, plane, alpha, db, n, dots);
  if (db) return grad_row_impl<scalar_t, acc_t, K, M, false, true>(g, tpl, plane, alpha, db, n, dots);
}

// ---- any K and M: the same arithmetic, one (tile, template) pair at a time ------------------------
template <typename scalar_t>
void mix_row_any(scalar_t* const* dst, const scalar_t* tpl, int64_t plane, const scalar_t* alpha, int64_t n, int K,
                 int M) {
  for (int m = 0; m < M; ++m) {
    const scalar_t* a = alpha + m * K;
    for (int64_t e = 0; e < n; ++e) dst[m][e] = tpl[e] * a[0];
    for (int k = 1; k < K; ++k)
      for (int64_t e = 0; e < n; ++e) dst[m][e] = dst[m][e] + tpl[k * plane + e] * a[k];
  }
}

template <typename scalar_t, typename acc_t>
void grad_row_any(const scalar_t* const* g, const scalar_t* tpl, int64_t plane, const scalar_t* alpha, scalar_t* db,
                  int64_t n, acc_t* dots, int K, int M) {
  for (int k = 0; k < K; ++k) {
    const scalar_t* tk = tpl + k * plane;
    for (int m = 0; m < M; ++m) {
      const scalar_t a = alpha[m * K + k];
      if (dots) {
        acc_t s = 0;
        for (int64_t e = 0; e < n; ++e) s += static_cast<acc_t>(g[m][e]) * static_cast<acc_t>(tk[e]);
        dots[m * K + k] += s;
      }
      if (db) {
        scalar_t* dk = db + k * plane;
        if (m == 0) {
          for (int64_t e = 0; e < n; ++e) dk[e] = g[0][e] * a;
        } else {
          for (int64_t e = 0; e < n; ++e) dk[e] = dk[e] + g[m][e] * a;
        }
      }
    }
  }
}

template <typename scalar_t, int K = 1, int M = 1>
void mix_row_dispatch(scalar_t* const* dst, const scalar_t* tpl, int64_t plane, const scalar_t* alpha, int64_t n,
                      int k, int m) {
  if constexpr (K <= kMaxK && M <= kMaxM) {
    if (k == K && m == M) return mix_row<scalar_t, K, M>(dst, tpl, plane, alpha, n);
    if (M < kMaxM && k == K) return mix_row_dispatch<scalar_t, K, M + 1>(dst, tpl, plane, alpha, n, k, m);
    if (M == 1) return mix_row_dispatch<scalar_t, K + 1, 1>(dst, tpl, plane, alpha, n, k, m);
  }
  mix_row_any<scalar_t>(dst, tpl, plane, alpha, n, k, m);
}

template <typename scalar_t, typename acc_t, int K = 1, int M = 1>
void grad_row_dispatch(const scalar_t* const* g, const scalar_t* tpl, int64_t plane, const scalar_t* alpha,
                       scalar_t* db, int64_t n, acc_t* dots, int k, int m) {
  if constexpr (K <= kMaxK && M <= kMaxM) {
    if (k == K && m == M) return grad_row<scalar_t, acc_t, K, M>(g, tpl, plane, alpha, db, n, dots);
    if (M < kMaxM && k == K) return grad_row_dispatch<scalar_t, acc_t, K, M + 1>(g, tpl, plane, alpha, db, n, dots, k, m);
    if (M == 1) return grad_row_dispatch<scalar_t, acc_t, K + 1, 1>(g, tpl, plane, alpha, db, n, dots, k, m);
  }
  grad_row_any<scalar_t, acc_t>(g, tpl, plane, alpha, db, n, dots, k, m);
}

// The tiles that mix each bank, and their coefficient rows gathered bank by bank.
struct BankTiles {
  std::vector<std::vector<int64_t>> tiles;  // tiles[b]: tile indices, in tile order
  template <typename scalar_t>
  std::vector<std::vector<scalar_t>> alphas(const scalar_t* alpha, int64_t K) const {
    std::vector<std::vector<scalar_t>> out;
    for (const auto& ts : tiles) {
      std::vector<scalar_t> a;
      for (auto t : ts) a.insert(a.end(), alpha + t * K, alpha + (t + 1) * K);
      out.push_back(std::move(a));
    }
    return out;
  }
};

BankTiles bank_tiles(size_t num_banks, const std::vector<int64_t>& tile_banks) {
  BankTiles bt{std::vector<std::vector<int64_t>>(num_banks)};
  for (size_t t = 0; t < tile_banks.size(); ++t) bt.tiles[tile_banks[t]].push_back(static_cast<int64_t>(t));
  return bt;
}

template <typename scalar_t>
void forward_kernel(scalar_t* w, const std::vector<const scalar_t*>& banks, const scalar_t* alpha,
                    const std::vector<int64_t>& tile_banks, const Layout& L) {
  const int64_t plane = L.o * L.n;  // one template
  const BankTiles bt = bank_tiles(banks.size(), tile_banks);
  const auto alphas = bt.alphas(alpha, L.K);
  at::parallel_for(0, L.o, grain_rows(L.R * L.C * L.n), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t*> dst;
    for (int64_t r = begin; r < end; ++r) {
      for (size_t b = 0; b < banks.size(); ++b) {
        const auto& ts = bt.tiles[b];
        if (ts.empty()) continue;
        dst.clear();
        for (auto t : ts) dst.push_back(w + (((t / L.C) * L.o + r) * L.C + t % L.C) * L.n);
        mix_row_dispatch<scalar_t>(dst.data(), banks[b] + r * L.n, plane, alphas[b].data(), L.n, L.K, ts.size());
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* g, const std::vector<const scalar_t*>& banks, const scalar_t* alpha,
                     const std::vector<int64_t>& tile_banks, const Layout& L,
                     const std::vector<scalar_t*>& d_banks,  // nullptr: not needed
                     scalar_t* d_alpha) {                    // nullptr: not needed
  using acc_t = at::acc_type<scalar_t, false>;
  const int64_t T = L.R * L.C, plane = L.o * L.n;
  const BankTiles bt = bank_tiles(banks.size(), tile_banks);
  const auto alphas = bt.alphas(alpha, L.K);
  // partial[r][b][u][k]: <row r of dW_t, row r of T_k> for the u-th tile t of bank b (laid out per bank)
  std::vector<int64_t> offset(banks.size() + 1, 0);
  for (size_t b = 0; b < banks.size(); ++b) offset[b + 1] = offset[b] + bt.tiles[b].size() * L.K;
  const int64_t per_row = offset.back();
  std::vector<acc_t> partial(d_alpha ? L.o * per_row : 0, acc_t(0));

  at::parallel_for(0, L.o, grain_rows(T * L.n), [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> src;
    for (int64_t r = begin; r < end; ++r) {
      for (size_t b = 0; b < banks.size(); ++b) {
        const auto& ts = bt.tiles[b];
        scalar_t* db = d_banks[b] ? d_banks[b] + r * L.n : nullptr;
        if (ts.empty()) {
          if (db) {
            for (int64_t k = 0; k < L.K; ++k) std::fill_n(db + k * plane, L.n, scalar_t(0));
          }
          continue;
        }
        if (!db && !d_alpha) continue;
        src.clear();
        for (auto t : ts) src.push_back(g + (((t / L.C) * L.o + r) * L.C + t % L.C) * L.n);
        acc_t* dots = d_alpha ? partial.data() + r * per_row + offset[b] : nullptr;
        grad_row_dispatch<scalar_t, acc_t>(src.data(), banks[b] + r * L.n, plane, alphas[b].data(), db, L.n, dots,
                                           L.K, ts.size());
      }
    }
    store_fence();  // the streaming stores of this thread are visible before the kernel returns
  });
  if (d_alpha) {  // sum the rows in a fixed order
    for (size_t b = 0; b < banks.size(); ++b) {
      for (size_t u = 0; u < bt.tiles[b].size(); ++u) {
        for (int64_t k = 0; k < L.K; ++k) {
          acc_t s = 0;
          for (int64_t r = 0; r < L.o; ++r) s += partial[r * per_row + offset[b] + u * L.K + k];
          d_alpha[bt.tiles[b][u] * L.K + k] = static_cast<scalar_t>(s);
        }
      }
    }
  }
}

at::Tensor grid_forward(const at::Tensor& coef_in, at::TensorList banks_in, int64_t R, int64_t C,
                        at::IntArrayRef tile_banks_in) {
  const std::vector<int64_t> tile_banks(tile_banks_in.begin(), tile_banks_in.end());
  const Layout L = check_inputs(coef_in, banks_in, R, C, tile_banks);
  auto coef = coef_in.contiguous();
  std::vector<at::Tensor> banks;
  for (const auto& b : banks_in) banks.push_back(b.contiguous());
  auto shape = banks[0].sizes().vec();
  shape.erase(shape.begin());
  shape[0] *= R;
  shape[1] *= C;
  at::Tensor w = at::empty(shape, banks[0].options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "morph_grid_forward", [&] {
    std::vector<const scalar_t*> ptrs;
    for (const auto& b : banks) ptrs.push_back(b.data_ptr<scalar_t>());
    forward_kernel<scalar_t>(w.data_ptr<scalar_t>(), ptrs, coef.data_ptr<scalar_t>(), tile_banks, L);
  });
  return w;
}

// [d_coefficients, d_bank_0, ...]; a gradient that is not needed is an empty (0-element) tensor
std::vector<at::Tensor> grid_backward(const at::Tensor& grad_in, const at::Tensor& coef_in, at::TensorList banks_in,
                                      int64_t R, int64_t C, at::IntArrayRef tile_banks_in, bool need_alpha,
                                      at::IntArrayRef need_banks) {
  const std::vector<int64_t> tile_banks(tile_banks_in.begin(), tile_banks_in.end());
  const Layout L = check_inputs(coef_in, banks_in, R, C, tile_banks);
  TORCH_CHECK(need_banks.size() == banks_in.size(), "morph grid: need_banks has ", need_banks.size(),
              " entries for ", banks_in.size(), " banks");
  auto grad = grad_in.contiguous();  // a conv backward may return channels_last
  auto coef = coef_in.contiguous();
  std::vector<at::Tensor> banks;
  for (const auto& b : banks_in) banks.push_back(b.contiguous());
  TORCH_CHECK(grad.numel() == R * C * L.o * L.n && grad.scalar_type() == coef.scalar_type(),
              "morph grid: gradient ", grad.sizes(), " does not match the weight");
  std::vector<at::Tensor> out;
  out.push_back(at::empty(need_alpha ? std::vector<int64_t>{R * C, L.K} : std::vector<int64_t>{0}, coef.options()));
  for (size_t b = 0; b < banks.size(); ++b) {
    out.push_back(need_banks[b] ? at::empty_like(banks[b]) : at::empty({0}, banks[b].options()));
  }
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "morph_grid_backward", [&] {
    std::vector<const scalar_t*> ptrs;
    std::vector<scalar_t*> d_ptrs;
    for (size_t b = 0; b < banks.size(); ++b) {
      ptrs.push_back(banks[b].data_ptr<scalar_t>());
      d_ptrs.push_back(need_banks[b] ? out[b + 1].data_ptr<scalar_t>() : nullptr);
    }
    backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), ptrs, coef.data_ptr<scalar_t>(), tile_banks, L, d_ptrs,
                              need_alpha ? out[0].data_ptr<scalar_t>() : nullptr);
  });
  return out;
}

// The ops through the dispatcher, so that the profiler records them and the Autograd kernel below
// reaches the CPU (or fake) kernels.
at::Tensor call_grid(const at::Tensor& coef, at::TensorList banks, int64_t R, int64_t C, at::IntArrayRef tile_banks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("morph::grid", "")
                       .typed<at::Tensor(const at::Tensor&, at::TensorList, int64_t, int64_t, at::IntArrayRef)>();
  return op.call(coef, banks, R, C, tile_banks);
}

std::vector<at::Tensor> call_grid_backward(const at::Tensor& grad, const at::Tensor& coef, at::TensorList banks,
                                           int64_t R, int64_t C, at::IntArrayRef tile_banks, bool need_alpha,
                                           at::IntArrayRef need_banks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("morph::grid_backward", "")
                       .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList, int64_t,
                                                      int64_t, at::IntArrayRef, bool, at::IntArrayRef)>();
  return op.call(grad, coef, banks, R, C, tile_banks, need_alpha, need_banks);
}

struct GridFunction : public torch::autograd::Function<GridFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& coef, at::TensorList banks, int64_t R, int64_t C,
                            at::IntArrayRef tile_banks) {
    at::Tensor w;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      w = call_grid(coef, banks, R, C, tile_banks);
    }
    std::vector<at::Tensor> saved{coef};
    std::vector<int64_t> need_banks;
    for (const auto& b : banks) {
      saved.push_back(b);
      need_banks.push_back(b.requires_grad());
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["R"] = R;
    ctx->saved_data["C"] = C;
    ctx->saved_data["tile_banks"] = tile_banks.vec();
    ctx->saved_data["need_alpha"] = coef.requires_grad();
    ctx->saved_data["need_banks"] = need_banks;
    return w;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor coef = saved[0];
    std::vector<at::Tensor> banks(saved.begin() + 1, saved.end());
    const auto tile_banks = ctx->saved_data["tile_banks"].toIntVector();
    const auto need_banks = ctx->saved_data["need_banks"].toIntVector();
    const bool need_alpha = ctx->saved_data["need_alpha"].toBool();
    auto out = call_grid_backward(grads[0], coef, banks, ctx->saved_data["R"].toInt(), ctx->saved_data["C"].toInt(),
                                  tile_banks, need_alpha, need_banks);
    // one gradient per forward argument: coef, each bank, then R, C, tile_banks (not differentiable)
    if (!need_alpha) out[0] = at::Tensor();
    for (size_t b = 0; b < need_banks.size(); ++b) {
      if (!need_banks[b]) out[b + 1] = at::Tensor();
    }
    out.emplace_back();
    out.emplace_back();
    out.emplace_back();
    return out;
  }
};

at::Tensor grid_autograd(const at::Tensor& coef, at::TensorList banks, int64_t R, int64_t C,
                         at::IntArrayRef tile_banks) {
  return GridFunction::apply(coef, banks, R, C, tile_banks);
}

}  // namespace

// One op each, so that torch.compile and the profiler see morph::grid (and its backward) as one op.
// morph/native.py registers their fake (shape-only) implementations for torch.compile.
TORCH_LIBRARY(morph, m) {
  m.def("grid(Tensor coefficients, Tensor[] banks, int rows, int cols, int[] tile_banks) -> Tensor");
  m.def(
      "grid_backward(Tensor grad, Tensor coefficients, Tensor[] banks, int rows, int cols, int[] tile_banks, "
      "bool need_coefficients, int[] need_banks) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(morph, CPU, m) {
  m.impl("grid", &grid_forward);
  m.impl("grid_backward", &grid_backward);
}

TORCH_LIBRARY_IMPL(morph, Autograd, m) { m.impl("grid", &grid_autograd); }
