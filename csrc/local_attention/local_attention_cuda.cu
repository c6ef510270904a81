// local_attention CUDA kernels (torch-free). Channels-last fp32 inputs.
//
// Both kernels give each query pixel a team of kTeam lanes (a quarter warp). For each candidate the lanes split the
// dot product over 4-channel chunks (a team reads a key's channels as one contiguous run) and add their partials with
// shuffles in a fixed butterfly, so every lane holds the same score, bit for bit in the forward and the backward
// (scaled with __fmul_rn, never contracted: the threshold rule compares scores exactly).
// Forward: a pass over the N*Q candidates keeps a running top-k (a sorted list spread over the team's registers:
// later candidates enter only when strictly larger, so ties go to the lower index) or the running maximum; a second
// pass (softmax over all / threshold) or the list (top-k) accumulates the max-subtracted exponentials and the values,
// the lanes splitting the Cv value channels. Backward recomputes the kept scores with the saved log-sum-exp /
// threshold / top-k indices: dq in the team's own row, dk and dv scattered with fp32 atomics, lanes splitting the
// channels.
#include <cmath>
#include <cstdint>

#include "local_attention/local_attention_cuda.cuh"
#include "common/cuda_types.cuh"

namespace vosops {
namespace local_attention {
namespace {

constexpr int kThreads = 128;
constexpr int kTeam = 8;  // lanes per query: team_sum's butterfly assumes 8
static_assert(kThreads % 32 == 0 && 32 % kTeam == 0, "teams must tile whole warps");

// Flat key position y*W + x of in-window column t of reference n for query (b, i, j), or -1 outside the frame.
__device__ __forceinline__ int64_t key_pos(const CudaProblem& p, int64_t b, int64_t n, int64_t t, int64_t i,
                                           int64_t j) {
  int64_t oy = 0, ox = 0;
  if (p.offsets != nullptr) {
    const int32_t* o = p.offsets + ((b * p.N + n) * 2 * p.H + i) * p.W + j;
    ox = o[0];
    oy = o[p.H * p.W];
  }
  // 32-bit: a window's columns and side are small, and a 64-bit division is a subroutine call on the GPU
  const int32_t col = p.cols[t], side = static_cast<int32_t>(2 * p.radius + 1), r = static_cast<int32_t>(p.radius);
  const int64_t y = i + oy + static_cast<int64_t>(col / side - r) * p.dilation;
  const int64_t x = j + ox + static_cast<int64_t>(col % side - r) * p.dilation;
  return (y >= 0 && y < p.H && x >= 0 && x < p.W) ? y * p.W + x : -1;
}

// The channels are split into chunks of 4; lane g of a team owns chunks g, g + kTeam, g + 2 kTeam, ... and sums
// its channels in increasing order in one fmaf chain (its partial). The partials are then added in a fixed tree.
// The chunking does not depend on alignment: float4 loads, where both rows allow them, only fetch the same channels.
constexpr int kChunk = 4;

// A query row as the team's lanes read it: lane g's chunks (g, g + kTeam) in registers when they all fit (C a
// multiple of 4 up to kTeam * kChunk * kQRegChunks = 64 channels, MAMP's, and a 16-byte aligned row), so the
// candidate loop loads only keys; otherwise the row is read from memory per candidate.
constexpr int kQRegChunks = 2;

struct QRow {
  const float* ptr;
  float4 reg[kQRegChunks];
  bool in_regs;
};

__device__ __forceinline__ QRow load_q(const CudaProblem& p, const float* __restrict__ qv, int g) {
  QRow q;
  q.ptr = qv;
  q.in_regs = (p.C & 3) == 0 && p.C <= kTeam * kChunk * kQRegChunks && (reinterpret_cast<uintptr_t>(qv) & 15) == 0;
#pragma unroll
  for (int r = 0; r < kQRegChunks; ++r) {
    const int64_t c = (int64_t(g) + int64_t(r) * kTeam) * kChunk;
    q.reg[r] = q.in_regs && c < p.C ? *reinterpret_cast<const float4*>(qv + c) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  return q;
}

// Lane g's partial: its chunks in increasing order, each chunk's channels in order, one fmaf chain (the same
// arithmetic whichever way q and the key row are loaded).
__device__ __forceinline__ float partial_dot(const CudaProblem& p, const QRow& q, const float* __restrict__ kv,
                                             int g) {
  const bool k_vec = (reinterpret_cast<uintptr_t>(kv) & 15) == 0;
  float s = 0.f;
  if (q.in_regs) {
#pragma unroll
    for (int r = 0; r < kQRegChunks; ++r) {
      const int64_t c = (int64_t(g) + int64_t(r) * kTeam) * kChunk;
      if (c >= p.C) break;
      const float4 a = q.reg[r];
      const float4 kk = k_vec ? __ldg(reinterpret_cast<const float4*>(kv + c))
                              : make_float4(__ldg(kv + c), __ldg(kv + c + 1), __ldg(kv + c + 2), __ldg(kv + c + 3));
      s = fmaf(a.x, kk.x, s);
      s = fmaf(a.y, kk.y, s);
      s = fmaf(a.z, kk.z, s);
      s = fmaf(a.w, kk.w, s);
    }
    return s;
  }
  const float* qv = q.ptr;
  const bool vec = (p.C & 3) == 0 && k_vec && (reinterpret_cast<uintptr_t>(qv) & 15) == 0;
  for (int64_t c = int64_t(g) * kChunk; c < p.C; c += kTeam * kChunk) {
    if (vec) {
      const float4 a = *reinterpret_cast<const float4*>(qv + c), kk = __ldg(reinterpret_cast<const float4*>(kv + c));
      s = fmaf(a.x, kk.x, s);
      s = fmaf(a.y, kk.y, s);
      s = fmaf(a.z, kk.z, s);
      s = fmaf(a.w, kk.w, s);
    } else {
      for (int64_t e = c; e < c + kChunk && e < p.C; ++e) s = fmaf(qv[e], __ldg(kv + e), s);
    }
  }
  return s;
}

// The lanes of this thread's team within its warp (a team works on one query, so its lanes never diverge).
__device__ __forceinline__ unsigned team_mask() { return 0xffu << ((threadIdx.x % 32) & ~unsigned(kTeam - 1)); }

// The sum of a team's eight partials, identical in every lane: ((x0+x4)+(x2+x6)) + ((x1+x5)+(x3+x7)) (addition is
// commutative, so each lane's own-plus-partner order gives the same bits). Every lane of the team calls it.
template <typename V>
__device__ __forceinline__ V team_sum(V x) {
  const unsigned mask = team_mask();
  x += __shfl_xor_sync(mask, x, 4, kTeam);
  x += __shfl_xor_sync(mask, x, 2, kTeam);
  x += __shfl_xor_sync(mask, x, 1, kTeam);
  return x;
}

__device__ __forceinline__ const float* key_row(const CudaProblem& p, int64_t b, int64_t n, int64_t pos) {
  return p.k + ((b * p.N + n) * p.H * p.W + pos) * p.C;
}

__device__ __forceinline__ float outside_score(const CudaProblem& p) { return p.zero_border ? 0.f : -INFINITY; }

// A team's score of the same candidate, lane g; every lane of the team calls it (pos is the team's own).
__device__ __forceinline__ float team_score(const CudaProblem& p, const QRow& q, int64_t b, int64_t n, int64_t pos,
                                            int g) {
  const float s = team_sum(pos < 0 ? 0.f : partial_dot(p, q, key_row(p, b, n, pos), g));
  return pos < 0 ? outside_score(p) : __fmul_rn(p.scale, s);
}

// A team's running top-k list, descending by score, ties to the earlier candidate: slot e lives in lane e % kTeam,
// register e / kTeam, so each lane holds MAXK / kTeam slots in registers (a whole list per lane would sit in local
// memory, eight copies per query, and every insertion would shift it there). cnt and kth (slot K-1's score once
// the list is full: the admission threshold) are the same in every lane.
template <int MAXK>
struct TeamList {
  static constexpr int R = MAXK > 0 ? (MAXK + kTeam - 1) / kTeam : 1;
  float s[R];
  int32_t i[R];
  int cnt;
  float kth;
};

template <int MAXK>
__device__ __forceinline__ void team_list_init(TeamList<MAXK>& L) {
#pragma unroll
  for (int r = 0; r < TeamList<MAXK>::R; ++r) {
    L.s[r] = -INFINITY;
    L.i[r] = 0;
  }
  L.cnt = 0;
  L.kth = -INFINITY;
}

// Insert candidate e with score s (candidates arrive in increasing e; every lane of the team calls it with the same
// s and e). A full list admits only s > kth. The new slot j is the start slot minus the number of kept entries
// strictly below s (they form the tail), and the slots from j on shift down by one, each lane taking its
// predecessor's value with one shuffle per register (lane 0's predecessor is lane kTeam-1's previous register).
// A later candidate's score s ranks before a kept t: larger, or NaN over a number (NaN first, as torch.sort and
// ranks_before order them; an equal later candidate loses the tie).
__device__ __forceinline__ bool later_ranks_before(float s, float t) { return s > t || (s != s && t == t); }

template <int MAXK>
__device__ __forceinline__ void team_list_push(TeamList<MAXK>& L, float s, int32_t e, int K, int g) {
  constexpr int R = TeamList<MAXK>::R;
  if (L.cnt == K && !later_ranks_before(s, L.kth)) return;
  const int start = L.cnt < K ? L.cnt : K - 1;  // when full, the last slot drops out
  int below = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) below += (r * kTeam + g < start && later_ranks_before(s, L.s[r])) ? 1 : 0;
  const int j = start - team_sum(below);
  const unsigned mask = team_mask();
  const int from = (g + kTeam - 1) % kTeam;
  float carry_s = 0.f;
  int32_t carry_i = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float up_s = __shfl_sync(mask, L.s[r], from, kTeam);
    const int32_t up_i = __shfl_sync(mask, L.i[r], from, kTeam);
    const int slot = r * kTeam + g;
    if (slot == j) {
      L.s[r] = s;
      L.i[r] = e;
    } else if (slot > j && slot <= start) {
      L.s[r] = g == 0 ? carry_s : up_s;
      L.i[r] = g == 0 ? carry_i : up_i;
    }
    carry_s = up_s;  // lane 0: slot r * kTeam + kTeam - 1, the predecessor of its next register's slot
    carry_i = up_i;
  }
  if (L.cnt < K) ++L.cnt;
  if (L.cnt == K) {
    const int rk = (K - 1) / kTeam;
    float v = L.s[0];
#pragma unroll
    for (int r = 1; r < R; ++r)
      if (r == rk) v = L.s[r];
    L.kth = __shfl_sync(mask, v, (K - 1) % kTeam, kTeam);
  }
}

template <int MAXK>
__global__ void __launch_bounds__(kThreads, 4) forward_kernel(const CudaProblem p, float* __restrict__ out,
                                                           float* __restrict__ stats, float* __restrict__ top_logits,
                                                           int64_t* __restrict__ top_index) {
  __shared__ float team_scores[(kThreads / kTeam) * (MAXK > 0 ? MAXK : 1)];
  __shared__ int32_t team_index[(kThreads / kTeam) * (MAXK > 0 ? MAXK : 1)];
  const int64_t HW = p.H * p.W, total = p.B * HW, Q = p.Q;
  const int K = static_cast<int>(p.topk);
  const int g = static_cast<int>(threadIdx.x % kTeam);
  const int64_t teams = static_cast<int64_t>(blockDim.x) * gridDim.x / kTeam;
  for (int64_t qi = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kTeam; qi < total; qi += teams) {
    const int64_t b = qi / HW, i = (qi % HW) / p.W, j = qi % p.W;
    const QRow qrow = load_q(p, p.q + qi * p.C, g);
    TeamList<MAXK> list;
    team_list_init(list);
    float m = -INFINITY, thr = -INFINITY;
    // Pass 1: scores -> running top-k or running maximum (the same in every lane of the team).
    for (int64_t n = 0; n < p.N; ++n) {
      for (int64_t t = 0; t < Q; ++t) {
        const float s = team_score(p, qrow, b, n, key_pos(p, b, n, t, i, j), g);
        if (MAXK > 0) {
          team_list_push<MAXK>(list, s, static_cast<int32_t>(n * Q + t), K, g);
        } else {
          m = (s > m || s != s) ? s : m;  // fmaxf would drop a NaN; here it stays
        }
      }
    }
    // The kept list, to the team's region of shared memory: the gathers below read its entries in any lane.
    float* ts = team_scores + (threadIdx.x / kTeam) * (MAXK > 0 ? MAXK : 1);
    int32_t* ti = team_index + (threadIdx.x / kTeam) * (MAXK > 0 ? MAXK : 1);
    if (MAXK > 0) {
      __syncwarp(team_mask());  // the team is done reading its previous query's list
#pragma unroll
      for (int r = 0; r < TeamList<MAXK>::R; ++r) {
        if (r * kTeam + g < K) {
          ts[r * kTeam + g] = list.s[r];
          ti[r * kTeam + g] = list.i[r];
        }
      }
      __syncwarp(team_mask());
      m = ts[0];
      if (p.normalize == Normalize::Threshold) thr = ts[K - 1];
      for (int e = g; e < K; e += kTeam) {
        top_logits[qi * K + e] = ts[e];
        top_index[qi * K + e] = (ti[e] / Q) * p.P + p.cols[ti[e] % Q];
      }
    }
    float* o = out + b * p.Cv * HW + i * p.W + j;
    if (m != m) {  // a NaN score (from a NaN or inf feature): the query's output is NaN, as the reference's
      for (int64_t c = g; c < p.Cv; c += kTeam) o[c * HW] = m;
      if (g == 0) {
        stats[qi * 2] = m;
        stats[qi * 2 + 1] = thr;
      }
      continue;
    }
    if (!(m > -INFINITY)) {  // nothing kept (the whole team agrees): zero output, lse = +inf gives zero gradient
      for (int64_t c = g; c < p.Cv; c += kTeam) o[c * HW] = 0.f;
      if (g == 0) {
        stats[qi * 2] = INFINITY;
        stats[qi * 2 + 1] = thr;
      }
      continue;
    }
    float sum = 0.f;
    if (MAXK > 0 && p.normalize == Normalize::Softmax) {
      // Top-k softmax: weights over the list, then one gather of the winners' values; lanes split the channels.
      for (int e = 0; e < K; ++e)
        if (ts[e] > -INFINITY) sum += expf(ts[e] - m);
      for (int64_t c = g; c < p.Cv; c += kTeam) {
        float acc = 0.f;
        for (int e = 0; e < K; ++e) {
          if (!(ts[e] > -INFINITY)) continue;
          const int64_t n = ti[e] / Q;
          const int64_t pos = key_pos(p, b, n, ti[e] % Q, i, j);
          if (pos >= 0) acc += expf(ts[e] - m) * __ldg(p.v + ((b * p.N + n) * HW + pos) * p.Cv + c);
        }
        o[c * HW] = acc / sum;
      }
    } else {
      // Softmax over all / threshold: recompute the scores; lane g accumulates value channels c0 + g.
      for (int64_t c0 = 0; c0 < p.Cv; c0 += kTeam) {
        const int64_t c = c0 + g;
        float acc = 0.f, s_sum = 0.f;
        for (int64_t n = 0; n < p.N; ++n) {
          for (int64_t t = 0; t < Q; ++t) {
            const int64_t pos = key_pos(p, b, n, t, i, j);
            const float s = team_score(p, qrow, b, n, pos, g);
            if (!(s > -INFINITY) || s < thr) continue;
            const float w = expf(s - m);
            s_sum += w;
            if (pos >= 0 && c < p.Cv) acc = fmaf(w, __ldg(p.v + ((b * p.N + n) * HW + pos) * p.Cv + c), acc);
          }
        }
        sum = s_sum;
        if (c < p.Cv) o[c * HW] = acc / sum;
      }
    }
    if (g == 0) {
      stats[qi * 2] = m + logf(sum);
      stats[qi * 2 + 1] = thr;
    }
  }
}

// Position t of window column `col` among the ascending in-window columns (binary search).
__device__ __forceinline__ int64_t column_position(const CudaProblem& p, int64_t col) {
  int64_t lo = 0, hi = p.Q - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (p.cols[mid] < col) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The in-window column position of a saved top-k index n*P + p, or -1 for an index the forward cannot have made
// (n outside [0, N), p not an in-window column): the CPU glue raises for those, here they are skipped, never read.
__device__ __forceinline__ int64_t saved_column(const CudaProblem& p, int64_t full) {
  if (full < 0 || full >= p.N * p.P) return -1;
  const int64_t t = column_position(p, full % p.P);
  return p.cols[t] == full % p.P ? t : -1;
}

// Per candidate of the backward: dp = <g, v_c> (0 out of frame), lanes splitting the Cv channels; the same value
// in every lane of the team, which calls it together.
__device__ __forceinline__ float team_value_dot(const CudaProblem& p, const float* __restrict__ gv, int64_t b,
                                               int64_t n, int64_t pos, int g) {
  float d = 0.f;
  if (pos >= 0) {
    const float* vv = p.v + ((b * p.N + n) * p.H * p.W + pos) * p.Cv;
    for (int64_t c = g; c < p.Cv; c += kTeam) d = fmaf(gv[c], __ldg(vv + c), d);
  }
  return team_sum(d);
}

// Lane g's share of one kept candidate's gradients: its q/k channel chunks and its value channels.
__device__ __forceinline__ void team_scatter(const CudaProblem& p, const float* __restrict__ qv,
                                             const float* __restrict__ gv, int64_t b, int64_t n, int64_t pos,
                                             float ds, float pe, float* dqv, float* dk, float* dv, int g) {
  if (pos < 0) return;  // zero-border candidate: constant logit, zero value
  const int64_t kb = (b * p.N + n) * p.H * p.W + pos;
  const float w = p.scale * ds;
  for (int64_t c0 = int64_t(g) * kChunk; c0 < p.C; c0 += kTeam * kChunk) {
    for (int64_t c = c0; c < c0 + kChunk && c < p.C; ++c) {
      if (dqv != nullptr) dqv[c] = fmaf(w, __ldg(p.k + kb * p.C + c), dqv[c]);  // the team's own row
      if (dk != nullptr) atomicAdd(dk + kb * p.C + c, w * qv[c]);
    }
  }
  if (dv != nullptr)
    for (int64_t c = g; c < p.Cv; c += kTeam) atomicAdd(dv + kb * p.Cv + c, pe * gv[c]);
}

__global__ void __launch_bounds__(kThreads) backward_kernel(const CudaProblem p, const float* __restrict__ grad_out,
                                                            const float* __restrict__ grad_logits,
                                                            const float* __restrict__ stats,
                                                            const int64_t* __restrict__ top_index,
                                                            float* __restrict__ dq, float* __restrict__ dk,
                                                            float* __restrict__ dv) {
  const int64_t HW = p.H * p.W, total = p.B * HW, Q = p.Q;
  const int64_t K = p.topk;
  const bool list_mode = K > 0 && p.normalize == Normalize::Softmax;
  const int g = static_cast<int>(threadIdx.x % kTeam);
  const int64_t teams = static_cast<int64_t>(blockDim.x) * gridDim.x / kTeam;
  for (int64_t qi = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kTeam; qi < total; qi += teams) {
    const float lse = stats[qi * 2], thr = stats[qi * 2 + 1];
    if (lse == INFINITY) continue;  // nothing kept: zero gradient (a NaN lse goes on: NaN gradients)
    const int64_t b = qi / HW, i = (qi % HW) / p.W, j = qi % p.W;
    const float* qv = p.q + qi * p.C;
    const QRow qrow = load_q(p, qv, g);
    const float* gv = grad_out + qi * p.Cv;
    float* dqv = dq != nullptr ? dq + qi * p.C : nullptr;  // the team's own row: no atomics
    // Pass A: D = sum over kept of p * dp.  Pass B: ds = p (dp - D) (+ the returned logit's gradient), scatter.
    float D = 0.f;
    if (list_mode) {
      for (int64_t e = 0; e < K; ++e) {
        const int64_t full = top_index[qi * K + e], n = full / p.P;
        const int64_t t = saved_column(p, full);
        if (t < 0) continue;
        const int64_t pos = key_pos(p, b, n, t, i, j);
        const float s = team_score(p, qrow, b, n, pos, g);
        const float dp = team_value_dot(p, gv, b, n, pos, g);
        if (s > -INFINITY) D += expf(s - lse) * dp;
      }
      for (int64_t e = 0; e < K; ++e) {
        const int64_t full = top_index[qi * K + e], n = full / p.P;
        const int64_t t = saved_column(p, full);
        if (t < 0) continue;
        const int64_t pos = key_pos(p, b, n, t, i, j);
        const float s = team_score(p, qrow, b, n, pos, g);
        if (!(s > -INFINITY)) continue;
        const float pe = expf(s - lse);
        float ds = pe * (team_value_dot(p, gv, b, n, pos, g) - D);
        if (grad_logits != nullptr) ds += grad_logits[qi * K + e];
        team_scatter(p, qv, gv, b, n, pos, ds, pe, dqv, dk, dv, g);
      }
      continue;
    }
    for (int64_t n = 0; n < p.N; ++n) {
      for (int64_t t = 0; t < Q; ++t) {
        const int64_t pos = key_pos(p, b, n, t, i, j);
        const float s = team_score(p, qrow, b, n, pos, g);
        const float dp = team_value_dot(p, gv, b, n, pos, g);
        if (s > -INFINITY && s >= thr) D += expf(s - lse) * dp;
      }
    }
    for (int64_t n = 0; n < p.N; ++n) {
      for (int64_t t = 0; t < Q; ++t) {
        const int64_t pos = key_pos(p, b, n, t, i, j);
        const float s = team_score(p, qrow, b, n, pos, g);
        if (!(s > -INFINITY) || s < thr) continue;
        const float pe = expf(s - lse);
        float ds = pe * (team_value_dot(p, gv, b, n, pos, g) - D);
        if (grad_logits != nullptr) {  // threshold: a kept candidate may also be one of the returned logits
          const int64_t full = n * p.P + p.cols[t];
          for (int64_t e = 0; e < K; ++e)
            if (top_index[qi * K + e] == full) ds += grad_logits[qi * K + e];
        }
        team_scatter(p, qv, gv, b, n, pos, ds, pe, dqv, dk, dv, g);
      }
    }
  }
}

}  // namespace

// The grid of both kernels: kTeam threads per query (the emulation in tests/cuda_emulation launches the same).
inline unsigned int team_blocks(int64_t total) { return grid_stride_blocks(total * kTeam, kThreads); }

// Launchers. tests/cuda_emulation compiles the kernels above as host code (a host thread per CUDA thread) to check
// their logic against the reference on machines without a GPU; it skips these.
#ifndef VOSOPS_CUDA_EMULATION
cudaError_t forward_cuda(const CudaProblem& p, float* out, float* stats, float* top_logits, int64_t* top_index,
                         cudaStream_t stream) {
  const int64_t total = p.B * p.H * p.W;
  if (total == 0) return cudaSuccess;
  const unsigned int grid = team_blocks(total);
  if (p.topk == 0) {
    forward_kernel<0><<<grid, kThreads, 0, stream>>>(p, out, stats, top_logits, top_index);
  } else if (p.topk <= 8) {
    forward_kernel<8><<<grid, kThreads, 0, stream>>>(p, out, stats, top_logits, top_index);
  } else if (p.topk <= 16) {
    forward_kernel<16><<<grid, kThreads, 0, stream>>>(p, out, stats, top_logits, top_index);
  } else if (p.topk <= 64) {
    forward_kernel<64><<<grid, kThreads, 0, stream>>>(p, out, stats, top_logits, top_index);
  } else if (p.topk <= kCudaMaxTopk) {
    forward_kernel<kCudaMaxTopk><<<grid, kThreads, 0, stream>>>(p, out, stats, top_logits, top_index);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t backward_cuda(const CudaProblem& p, const float* grad_out, const float* grad_logits, const float* stats,
                          const int64_t* top_index, float* dq, float* dk, float* dv, cudaStream_t stream) {
  const int64_t total = p.B * p.H * p.W;
  if (total == 0) return cudaSuccess;
  backward_kernel<<<team_blocks(total), kThreads, 0, stream>>>(p, grad_out, grad_logits, stats, top_index, dq, dk,
                                                                   dv);
  return cudaGetLastError();
}

#endif  // VOSOPS_CUDA_EMULATION

}  // namespace local_attention
}  // namespace vosops
