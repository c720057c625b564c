// freeu_kernels CUDA backend: FreeU's backbone scaling, low-rank Fourier skip filter and concat in ONE launch.
//
// See csrc/README.md for the design; the math, per (n, c[, f]) skip plane h of size H x W:
//
//   h'[y,x] = g_hi h[y,x] + sum_{j<nx} ( Uc_j[y] cos(bx_j) + Us_j[y] sin(bx_j) ),  bx_j = 2 pi ((kx0+j) x mod W) / W
//   ay_i    = 2 pi ((ky0+i) y mod H) / H
//   Cr_j[y] = sum_x h cos(bx_j),  Sr_j[y] = sum_x h sin(bx_j)                       (row sums, "phase B")
//   R_ij    = sum_y Cr_j cos(ay_i) - Sr_j sin(ay_i)   = sum h cos(ay_i + bx_j)       (column sums, "phase C")
//   I_ij    = sum_y Sr_j cos(ay_i) + Cr_j sin(ay_i)   = sum h sin(ay_i + bx_j)
//   Q_ij    = w_ij (R_ij, I_ij),  w_ij = (s - g_hi) / (H W) inside the mask, else 0
//   Uc_j[y] = sum_i Qr_ij cos(ay_i) + Qi_ij sin(ay_i),  Us_j[y] = sum_i Qi_ij cos(ay_i) - Qr_ij sin(ay_i)   ("phase D")
//
// because Re(X(k) e^{i(a+b)}) = R cos(a+b) + I sin(a+b) = cos b (R cos a + I sin a) + sin b (I cos a - R sin a)
// with X(k) = R - iI. Everything is accumulated in float32; twiddles come from integer residues
// r = (k n) mod N (exact) and sincospif(2 r / N), so no angle ever grows with the plane size.
//
// Only CUDA headers are included: this file builds without torch, for any torch and Python version.

#ifdef FREEU_EMULATE
#include "emulate/cuda_emu.h"  // CPU execution of this same source for GPU-less tests (csrc/emulate/)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include <stdint.h>

#include <algorithm>
#include <atomic>

#include "freeu_fused_concat.h"

namespace {

constexpr int kThreads = 256;           // every block; __launch_bounds__ keeps registers <= 128 (2 blocks/SM)
constexpr int kMaxAxisFreq = 16;        // spec.MAX_LOWRANK_FREQUENCIES_PER_AXIS
constexpr int kJChunk = 4;              // x-frequencies accumulated per pass of the row sums (registers)
constexpr int kUnroll = 4;              // 16-byte vectors in flight per thread in the streaming loops
constexpr int64_t kSmemBudget = 48 * 1024;   // dynamic shared memory without an opt-in attribute call
constexpr int64_t kTableMaxEntries = 3072;   // H + W twiddle entries kept in shared memory (24 KiB)
constexpr int64_t kRowSumCap = 2048;         // float2 row sums per tile in the two-sweep path (16 KiB)
constexpr int64_t kMaxAxis = int64_t(1) << 30;  // H, W bound: every in-tile index fits 32-bit arithmetic
constexpr int kFlatUnroll = 8;          // flat roles: 16-byte vectors per thread, all loaded before any is used
constexpr int kTileRows = 4;            // register-tile filter: rows of one column chunk held by a thread
constexpr int kTileMaxFreq = 3;         // register-tile filter: compile-time bands of 1..3 frequencies per axis
constexpr int64_t kIndex31 = int64_t(1) << 31;  // fast 32-bit division takes numerators below 2^31

// Launch paths of a role (also reported by freeu_plan, FREEU_PATH_* in the header).
constexpr int kPathNone = FREEU_PATH_NONE;
constexpr int kPathFlat = FREEU_PATH_FLAT;          // scaled copy of contiguous runs
constexpr int kPathPlanes = FREEU_PATH_PLANES;      // elementwise over plane groups (any strides)
constexpr int kPathTile = FREEU_PATH_TILE;          // filter, planes held in registers
constexpr int kPathOnChip = FREEU_PATH_ON_CHIP;     // filter, planes staged in shared memory
constexpr int kPathTwoSweep = FREEU_PATH_TWO_SWEEP; // filter, two sweeps over global memory
constexpr int kPathClVectors = FREEU_PATH_CL_VECTORS; // filter, channels-last channel vectors x pixels

// ------------------------------------------------------------------------------------------------
// Parameters (computed on the host by plan(), read from the kernel's constant parameter space).
// ------------------------------------------------------------------------------------------------

// n / d for n < 2^31 by a multiply-high and a shift (Granlund-Montgomery, round-up variant): the magic
// m = floor(2^32 (2^s - d) / d) + 1 with s = ceil(log2 d) gives n / d = (umulhi(n, m) + n) >> s, and the
// sum cannot wrap because umulhi(n, m) < n < 2^31. Built on the host, used by the hot loops instead of a
// ~20-instruction integer division.
struct FastDiv {
    uint32_t d, m, s, pad_;
};

__host__ FastDiv make_fastdiv(uint32_t d) {
    uint32_t s = 0;
    while ((uint64_t(1) << s) < d) ++s;
    const uint64_t m = ((uint64_t(1) << 32) * ((uint64_t(1) << s) - d)) / d + 1;
    return FastDiv{d, static_cast<uint32_t>(m), s, 0};
}

__device__ __forceinline__ uint32_t fast_div(uint32_t n, const FastDiv& f) { return (__umulhi(n, f.m) + n) >> f.s; }

// One role of the launch: "backbone" (x -> out[:, :Cx]) or "skip" (h -> out[:, Cx:]).
// Its planes (n, c, f) are cut into groups of G planes; a task is one group x one chunk of rows.
struct RoleParams {
    const void* src;
    void* dst;
    int64_t ss[5];        // src element strides N, C, F, H, W
    int64_t ds[5];        // dst element strides
    int64_t channels;     // C of this role
    int64_t planes;       // N * C * F
    int64_t groups;       // number of plane groups
    int64_t cgroups;      // channels-last: groups per (n, f) = ceil(C / G)
    int64_t row_chunks;   // tasks per group (elementwise roles; 1 for the filter)
    int64_t tasks;        // groups * row_chunks
    int32_t G;            // planes per group
    int32_t rows;         // rows per task (elementwise), H for the filter
    int32_t vec;          // 1: 16-byte vectors along the contiguous axis
    int32_t path;         // kPath*
    // Flat path: the role's elements are runs of `run` contiguous elements in src and dst; run o starts at
    // o * src_outer (o * dst_outer). Planar: a run is one n (C F H W elements); channels-last: one pixel.
    int64_t src_outer, dst_outer;
    FastDiv run_vecs;     // 16-byte vectors per run
    uint32_t total_vecs;  // vectors of the role
    uint32_t task_vecs;   // vectors per task (kThreads * 1..kFlatUnroll)
    FastDiv run_tasks;    // planar: tasks per run (a task never crosses a run)
    uint32_t win_lo, win_hi;  // elements of a run inside the scaled window: planar [lo, hi), channels-last channels
    FastDiv fhw;          // F H W: planar v2 map offset within a run / channels-last n of a pixel run
};

struct Factor {           // b or s: read from device memory at run time (graph-replay safe) or by value
    const void* ptr;
    int32_t is_f64;
    float value;
};

struct KernelParams {
    RoleParams bb, sk;
    int64_t N, F, H, W;
    const float* map;     // version 2 scale map
    int64_t ms[4];        // its strides N, F, H, W
    int64_t win0, win1;
    Factor b, s;
    float high_gain;
    int32_t version;
    int32_t cl;           // channels-last enumeration: channel (plane in group) fastest
    int32_t filter;       // 0: the skip role is the plain product g_hi * h (empty band)
    int32_t ky0, ny, kx0, nx;
    int32_t radial;
    int32_t on_chip;      // 1: the group's planes are staged in shared memory (one sweep of global memory)
    int32_t pitch;        // on chip: elements between two planes in shared memory
    int32_t tile_rows;    // rows per reduction tile (H on chip)
    int32_t use_tab;      // twiddles from shared tables (else sincospif on the fly)
    int32_t lanes_row;    // lanes cooperating on one row sum (power of two <= 32)
    int32_t lanes_col;    // lanes cooperating on one column sum
    int64_t radius_sq;
    int32_t off_tx, off_ty, off_ri, off_rs, off_plane;  // shared-memory layout of the filter, bytes
    int32_t smem_bytes;
    // Register-tile filter (skip path kPathTile).
    int32_t tile_lanes;   // L = W / V lanes per row (power of two <= 32)
    int32_t tile_log2_lanes;
    int32_t tile_threads; // Tp = H L / kTileRows threads per plane (power of two <= kThreads)
    int32_t tile_log2_threads;
    int32_t tile_planes;  // kThreads / Tp planes per block
    int32_t tile_log2_cvecs;   // channels-last: log2 of the channel vectors per block (tile_planes / V)
    int32_t tile_log2_w;       // channels-last: log2 W
    uint32_t kx_res, ky_res;   // kx0 mod W, ky0 mod H
    uint32_t tile_mask;        // bit i NF + j: frequency (ky0 + i, kx0 + j) is inside the mask
    double inv_area;           // 1 / (H W)
    // Channel-vector filter (skip path kPathClVectors; lanes_row / lanes_col: lanes per row / per moment).
    int32_t clv_log2_vecs;     // log2 of the 16-byte channel vectors a block covers per pixel (0 or 1)
    int32_t clv_log2_lpr, clv_log2_lc;  // log2 lanes_row, log2 lanes_col
    FastDiv clv_groups;        // blocks per (n, f): C / (V << clv_log2_vecs)
    FastDiv div_f, div_c;      // plane -> (n, c, f) of the skip role
};

// Per-plane addressing, built once per task in shared memory so the hot loops do no (n, c, f) division.
struct PlaneInfo {
    int64_t src;          // element offset of (y, x) = (0, 0) in src
    int64_t dst;
    int64_t map;          // element offset of the plane's scale-map slice, -1: use `scale`
    float scale;
    int32_t pad_;
};

// ------------------------------------------------------------------------------------------------
// Small device helpers.
// ------------------------------------------------------------------------------------------------

template <typename T> struct Cvt;
template <> struct Cvt<float> {
    static __device__ __forceinline__ float in(float v) { return v; }
    static __device__ __forceinline__ float out(float v) { return v; }
};
template <> struct Cvt<__half> {
    static __device__ __forceinline__ float in(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half out(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
    static __device__ __forceinline__ float in(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 out(float v) { return __float2bfloat16_rn(v); }
};

// V elements moved as one access: 16 bytes (LDG.128 / STG.128) when V * sizeof(T) == 16, else V = 1.
template <typename T, int V> struct alignas(sizeof(T) * V) Pack {
    T e[V];
};

__device__ __forceinline__ uint32_t addmod(uint32_t r, uint32_t d, uint32_t n) {
    // r, d < n <= 2^30: the sum cannot wrap, one conditional subtraction reduces it.
    r += d;
    return r >= n ? r - n : r;
}

__device__ __forceinline__ uint32_t mulmod(uint32_t a, uint32_t b, uint32_t n) {
    // a, b < n. 32-bit when the product fits (planes up to 65535 wide), else 64-bit.
    if (n <= 65536u) return (a * b) % n;
    return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) % n);
}

__device__ __forceinline__ uint32_t posmod(int64_t k, int64_t n) {
    int64_t r = k % n;
    return static_cast<uint32_t>(r < 0 ? r + n : r);
}

// (cos, sin)(2 pi r / n) for an exact residue r < n. 2r and n are exact in float up to 2^24, the quotient
// is rounded once, and sincospif has no argument reduction error, so the result is within ~2 ulp.
__device__ __forceinline__ float2 twiddle_direct(uint32_t r, uint32_t n) {
    float s, c;
    sincospif(__fdiv_rn(2.0f * static_cast<float>(r), static_cast<float>(n)), &s, &c);
    return make_float2(c, s);
}

__device__ __forceinline__ float2 twiddle(const float2* tab, bool use_tab, uint32_t r, uint32_t n) {
    return use_tab ? tab[r] : twiddle_direct(r, n);
}

__host__ __device__ __forceinline__ uint32_t align16_dev(uint32_t v) { return (v + 15u) & ~15u; }

__device__ __forceinline__ float read_factor(const Factor& f) {
    if (f.ptr == nullptr) return f.value;
    return f.is_f64 ? static_cast<float>(*static_cast<const double*>(f.ptr)) : *static_cast<const float*>(f.ptr);
}

__device__ __forceinline__ float lane_group_sum(float v, int lanes) {
    // Butterfly over an aligned group of `lanes` lanes (power of two); every lane of the warp executes it.
#pragma unroll 1
    for (int off = lanes >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

struct Coord {
    int g;                // plane within the group
    uint32_t y, x;        // y is absolute (tile start added)
};

// Element L of a task's tile (G_eff planes x `rows` rows starting at y_lo), in memory order:
// planar layouts walk x fastest, channels-last walks the plane (channel) fastest.
__device__ __forceinline__ Coord tile_coord(bool cl, uint32_t L, int g_eff, uint32_t rows, uint32_t W, uint32_t y_lo) {
    uint32_t pos;
    int g;
    if (cl) {
        pos = L / static_cast<uint32_t>(g_eff);
        g = static_cast<int>(L - pos * static_cast<uint32_t>(g_eff));
    } else {
        const uint32_t area = rows * W;
        g = static_cast<int>(L / area);
        pos = L - static_cast<uint32_t>(g) * area;
    }
    const uint32_t yy = pos / W;
    return Coord{g, y_lo + yy, pos - yy * W};
}

// Plane count of a group, and (n, c, f) of its g-th plane.
__device__ __forceinline__ int group_size(const KernelParams& p, const RoleParams& r, int64_t group) {
    if (p.cl) {
        const int64_t c0 = (group % r.cgroups) * r.G;
        return static_cast<int>(min(static_cast<int64_t>(r.G), r.channels - c0));
    }
    return static_cast<int>(min(static_cast<int64_t>(r.G), r.planes - group * r.G));
}

__device__ __forceinline__ void plane_ncf(const KernelParams& p, const RoleParams& r, int64_t group, int g,
                                          int64_t& n, int64_t& c, int64_t& f) {
    if (p.cl) {  // planes ordered (n, f, c): a group is a run of channels of one (n, f)
        const int64_t nf = group / r.cgroups;
        c = (group % r.cgroups) * r.G + g;
        n = nf / p.F;
        f = nf - n * p.F;
    } else {     // planes ordered (n, c, f)
        const int64_t plane = group * r.G + g;
        const int64_t q = plane / p.F;
        f = plane - q * p.F;
        n = q / r.channels;
        c = q - n * r.channels;
    }
}

// Fills info[0, g_eff) for this group. role: 0 backbone (window scale), 1 skip elementwise (g_hi), 2 filter.
__device__ void fill_plane_info(const KernelParams& p, const RoleParams& r, int role, int64_t group, int g_eff,
                                PlaneInfo* info) {
#pragma unroll 1
    for (int g = threadIdx.x; g < g_eff; g += kThreads) {
        int64_t n, c, f;
        plane_ncf(p, r, group, g, n, c, f);
        PlaneInfo pi;
        pi.src = n * r.ss[0] + c * r.ss[1] + f * r.ss[2];
        pi.dst = n * r.ds[0] + c * r.ds[1] + f * r.ds[2];
        pi.map = -1;
        pi.scale = 1.0f;
        pi.pad_ = 0;
        if (role == 0 && c >= p.win0 && c < p.win1) {
            if (p.version == 2) pi.map = n * p.ms[0] + f * p.ms[1];
            else pi.scale = read_factor(p.b);
        } else if (role == 1) {
            pi.scale = p.high_gain;
        }
        info[g] = pi;
    }
}

// Issues the loads of up to kUnroll vectors v0 + u * kThreads of a tile before any is used (memory-level
// parallelism: kUnroll independent 16-byte requests in flight per thread).
template <typename T, int V>
__device__ __forceinline__ void load_vectors(const RoleParams& r, const PlaneInfo* info, bool cl, uint32_t v0,
                                             uint32_t nvec, int g_eff, uint32_t rows, uint32_t W, uint32_t y_lo,
                                             Pack<T, V> (&in)[kUnroll], Coord (&co)[kUnroll]) {
    const T* __restrict__ src = static_cast<const T*>(r.src);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const uint32_t v = v0 + u * kThreads;
        if (v < nvec) {
            co[u] = tile_coord(cl, v * V, g_eff, rows, W, y_lo);
            in[u] = *reinterpret_cast<const Pack<T, V>*>(src + info[co[u].g].src + co[u].y * r.ss[3] +
                                                         co[u].x * r.ss[4]);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Elementwise roles: backbone (x * window scale) and, for an empty band, skip (g_hi * h).
// ------------------------------------------------------------------------------------------------

template <typename T, int V>
__device__ void elementwise_tile(const KernelParams& p, const RoleParams& r, const PlaneInfo* info, int g_eff,
                                 uint32_t y_lo, uint32_t rows) {
    T* __restrict__ dst = static_cast<T*>(r.dst);
    const uint32_t W = static_cast<uint32_t>(p.W);
    const uint32_t nvec = static_cast<uint32_t>(g_eff) * rows * W / V;
    const bool cl = p.cl != 0;
#pragma unroll 1
    for (uint32_t v0 = threadIdx.x; v0 < nvec; v0 += kThreads * kUnroll) {
        Pack<T, V> in[kUnroll];
        Coord co[kUnroll];
        load_vectors<T, V>(r, info, cl, v0, nvec, g_eff, rows, W, y_lo, in, co);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const uint32_t v = v0 + u * kThreads;
            if (v < nvec) {
                Pack<T, V> o;
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    // planar vectors run along x (one plane), channels-last vectors along the planes.
                    const int g = cl ? co[u].g + e : co[u].g;
                    const uint32_t x = cl ? co[u].x : co[u].x + e;
                    const PlaneInfo& pi = info[g];
                    const float scale = pi.map >= 0 ? p.map[pi.map + co[u].y * p.ms[2] + x * p.ms[3]] : pi.scale;
                    o.e[e] = Cvt<T>::out(Cvt<T>::in(in[u].e[e]) * scale);
                }
                const int64_t off = info[co[u].g].dst + co[u].y * r.ds[3] + co[u].x * r.ds[4];
                *reinterpret_cast<Pack<T, V>*>(dst + off) = o;
            }
        }
    }
}

// V = 16-byte vectors or 1 (scalar accesses, any strides).
template <typename T, int V>
__device__ void elementwise_variant(const KernelParams& p, const RoleParams& r, int role, int64_t task,
                                    unsigned char* smem) {
    PlaneInfo* info = reinterpret_cast<PlaneInfo*>(smem);
    const int64_t group = task / r.row_chunks;
    const int64_t chunk = task - group * r.row_chunks;
    const int g_eff = group_size(p, r, group);
    const uint32_t y_lo = static_cast<uint32_t>(chunk * r.rows);
    const uint32_t rows = static_cast<uint32_t>(min(static_cast<int64_t>(r.rows), p.H - y_lo));
    fill_plane_info(p, r, role, group, g_eff, info);
    __syncthreads();
    elementwise_tile<T, V>(p, r, info, g_eff, y_lo, rows);
}

template <typename T>
__device__ void elementwise_task(const KernelParams& p, const RoleParams& r, int role, int64_t task,
                                 unsigned char* smem) {
    if (r.vec) elementwise_variant<T, 16 / sizeof(T)>(p, r, role, task, smem);
    else elementwise_variant<T, 1>(p, r, role, task, smem);
}


// ------------------------------------------------------------------------------------------------
// Flat roles: the backbone (and an empty band's skip, g_hi h) as a scaled copy of contiguous runs.
// ------------------------------------------------------------------------------------------------

// Vector v of the role (V elements) is element q = (v mod run_vecs) V of run o = v / run_vecs. Every
// thread loads all its kFlatUnroll vectors before it converts any (128 bytes in flight per thread), and
// the scale is found per vector. Planar: a task lies in one run (one n), so the run and the base pointers
// are found once per task and the vectors sit at constant offsets; a run holds whole channels, so a
// vector lies in one channel and is inside the window iff win_lo <= q < win_hi. Channels-last: a run is
// one pixel (runs are shorter than a task), found per vector; the window is compared per channel and the
// v2 map read once per vector. role 0: backbone (b, v1 or v2); 1: skip, g_hi.
template <typename T, bool CL, bool V2>
__device__ void flat_task(const KernelParams& p, const RoleParams& r, int role, int64_t task) {
    constexpr int V = 16 / sizeof(T);
    const T* __restrict__ src = static_cast<const T*>(r.src);
    T* __restrict__ dst = static_cast<T*>(r.dst);
    const uint32_t t = static_cast<uint32_t>(task);
    Pack<T, V> in[kFlatUnroll];
    uint32_t run[kFlatUnroll], q[kFlatUnroll];
    bool live[kFlatUnroll];
    if (CL) {
        const uint32_t v_first = t * r.task_vecs + threadIdx.x;
        const uint32_t v_end = min(r.total_vecs, t * r.task_vecs + r.task_vecs);
#pragma unroll
        for (int u = 0; u < kFlatUnroll; ++u) {
            const uint32_t v = v_first + u * kThreads;
            run[u] = fast_div(v, r.run_vecs);
            q[u] = (v - run[u] * r.run_vecs.d) * V;
            live[u] = v < v_end;
            if (live[u]) in[u] = *reinterpret_cast<const Pack<T, V>*>(src + run[u] * r.src_outer + q[u]);
        }
    } else {
        const uint32_t o = fast_div(t, r.run_tasks);
        const uint32_t v_first = (t - o * r.run_tasks.d) * r.task_vecs + threadIdx.x;  // within the run
        src += o * r.src_outer + v_first * V;
        dst += o * r.dst_outer + v_first * V;
#pragma unroll
        for (int u = 0; u < kFlatUnroll; ++u) {
            run[u] = o;
            q[u] = (v_first + u * kThreads) * V;
            live[u] = static_cast<uint32_t>(u * kThreads) < r.task_vecs && v_first + u * kThreads < r.run_vecs.d;
            if (live[u]) in[u] = *reinterpret_cast<const Pack<T, V>*>(src + u * kThreads * V);
        }
    }
    const float factor = role == 0 ? read_factor(p.b) : p.high_gain;
#pragma unroll
    for (int u = 0; u < kFlatUnroll; ++u) {
        if (!live[u]) continue;
        float scale[V];
        if (CL) {
            float map_value = factor;
            if (V2 && q[u] < r.win_hi && q[u] + V > r.win_lo) {
                const uint32_t n = fast_div(run[u], r.fhw);
                map_value = p.map[n * p.ms[0] + (run[u] - n * r.fhw.d)];
            }
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const uint32_t c = q[u] + e;
                scale[e] = c >= r.win_lo && c < r.win_hi ? map_value : 1.0f;
            }
        } else {
            const bool inside = q[u] >= r.win_lo && q[u] < r.win_hi;
            if (V2) {
                if (inside) {
                    const uint32_t within = q[u] - fast_div(q[u], r.fhw) * r.fhw.d;  // f H W + y W + x
                    const float4* m = reinterpret_cast<const float4*>(p.map + run[u] * p.ms[0] + within);
#pragma unroll
                    for (int k = 0; k < V / 4; ++k) {
                        const float4 m4 = m[k];
                        scale[4 * k] = m4.x;
                        scale[4 * k + 1] = m4.y;
                        scale[4 * k + 2] = m4.z;
                        scale[4 * k + 3] = m4.w;
                    }
                } else {
#pragma unroll
                    for (int e = 0; e < V; ++e) scale[e] = 1.0f;
                }
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e) scale[e] = inside ? factor : 1.0f;
            }
        }
        Pack<T, V> o;
#pragma unroll
        for (int e = 0; e < V; ++e) o.e[e] = Cvt<T>::out(Cvt<T>::in(in[u].e[e]) * scale[e]);
        if (CL) *reinterpret_cast<Pack<T, V>*>(dst + run[u] * r.dst_outer + q[u]) = o;
        else *reinterpret_cast<Pack<T, V>*>(dst + u * kThreads * V) = o;
    }
}

template <typename T>
__device__ void flat_dispatch(const KernelParams& p, const RoleParams& r, int role, int64_t task) {
    const bool v2 = role == 0 && p.version == 2;
    if (p.cl) {
        if (v2) flat_task<T, true, true>(p, r, role, task);
        else flat_task<T, true, false>(p, r, role, task);
    } else {
        if (v2) flat_task<T, false, true>(p, r, role, task);
        else flat_task<T, false, false>(p, r, role, task);
    }
}

// ------------------------------------------------------------------------------------------------
// The skip filter: one block per group of planes.
// ------------------------------------------------------------------------------------------------

struct FilterSmem {
    PlaneInfo* info;
    float2* tx;           // (cos, sin)(2 pi r / W), r < W
    float2* ty;           // (cos, sin)(2 pi r / H), r < H
    float2* ri;           // [g][i][j] weighted (R, I), accumulated over row tiles
    float2* rs;           // [g][row in tile][j] row sums (Cr, Sr), later (Uc, Us)
    void* plane;          // on chip: [g][y][x] native dtype, `pitch` elements per plane
};

// On chip: copy the group's planes from global to shared memory in their native dtype (16-byte vectors
// when the layout allows). Channels-last tiles are walked channel-fastest, so global reads coalesce.
template <typename T, int V, bool CL>
__device__ void stage_planes(const KernelParams& p, const FilterSmem& sm, int g_eff) {
    T* plane = static_cast<T*>(sm.plane);
    const uint32_t H = static_cast<uint32_t>(p.H), W = static_cast<uint32_t>(p.W);
    const uint32_t nvec = static_cast<uint32_t>(g_eff) * H * W / V;
    constexpr bool cl = CL;
#pragma unroll 1
    for (uint32_t v0 = threadIdx.x; v0 < nvec; v0 += kThreads * kUnroll) {
        Pack<T, V> in[kUnroll];
        Coord co[kUnroll];
        load_vectors<T, V>(p.sk, sm.info, cl, v0, nvec, g_eff, H, W, 0u, in, co);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const uint32_t v = v0 + u * kThreads;
            if (v < nvec) {
                const uint32_t at = static_cast<uint32_t>(co[u].g) * p.pitch + co[u].y * W + co[u].x;
                if (cl) {
#pragma unroll
                    for (int e = 0; e < V; ++e) plane[at + e * p.pitch] = in[u].e[e];
                } else {
                    *reinterpret_cast<Pack<T, V>*>(plane + at) = in[u];  // pitch, W multiples of V: aligned
                }
            }
        }
    }
}

// Phase B: row sums Cr_j[y], Sr_j[y] of rows [y_lo, y_lo + rows) of every plane of the group.
// A group of `lanes_row` lanes owns a row: each lane walks its chunks of V elements (x = (sub + m L) V + e),
// keeps kJChunk (cos, sin) accumulators, and the group reduces them with shuffles. Twiddle residues are
// advanced by additions only: r(x + 1) = r(x) + k, r_{j+1}(x) = r_j(x) + x (mod W).
template <typename T, int V, bool ON_CHIP, bool TAB>
__device__ void row_sums(const KernelParams& p, const FilterSmem& sm, int g_eff, uint32_t y_lo, uint32_t rows) {
    const RoleParams& r = p.sk;
    const uint32_t W = static_cast<uint32_t>(p.W);
    const int L = p.lanes_row;
    const int sub = threadIdx.x & (L - 1);
    const int n_groups = kThreads / L;
    const int group_id = threadIdx.x / L;
    const uint32_t items = static_cast<uint32_t>(g_eff) * rows;
    const uint32_t iters = (items + n_groups - 1) / n_groups;  // block-uniform: shuffles stay converged
    const T* __restrict__ src = static_cast<const T*>(r.src);
    const T* plane = static_cast<const T*>(sm.plane);
    constexpr bool use_tab = TAB;  // p.use_tab, a template parameter: the hot loops hold one twiddle source
    const uint32_t x_first = static_cast<uint32_t>(sub) * V;
    const uint32_t x_step = static_cast<uint32_t>(L) * V;
#pragma unroll 1
    for (int j0 = 0; j0 < p.nx; j0 += kJChunk) {
        const uint32_t kc = posmod(static_cast<int64_t>(p.kx0) + j0, W);  // k of the chunk's first frequency
        const uint32_t r_first = x_first < W ? mulmod(kc, x_first, W) : 0u;
        const uint32_t r_step = mulmod(kc, x_step % W, W);
#pragma unroll 1
        for (uint32_t it = 0; it < iters; ++it) {
            const uint32_t item = group_id + it * n_groups;
            const bool valid = item < items;
            float c[kJChunk], s[kJChunk];
#pragma unroll
            for (int jj = 0; jj < kJChunk; ++jj) c[jj] = s[jj] = 0.0f;
            const int g = valid ? static_cast<int>(item / rows) : 0;
            const uint32_t yy = valid ? item - static_cast<uint32_t>(g) * rows : 0u;
            if (valid) {
                const uint32_t y = y_lo + yy;
                uint32_t rb = r_first;  // (kc * x) mod W at the chunk's first element
#pragma unroll 1
                for (uint32_t x0 = x_first; x0 < W; x0 += x_step) {
                    float hv[V];
                    if (ON_CHIP) {
                        hv[0] = Cvt<T>::in(plane[static_cast<uint32_t>(g) * p.pitch + y * W + x0]);
                    } else {
                        const Pack<T, V> pk =
                            *reinterpret_cast<const Pack<T, V>*>(src + sm.info[g].src + y * r.ss[3] + x0 * r.ss[4]);
#pragma unroll
                        for (int e = 0; e < V; ++e) hv[e] = Cvt<T>::in(pk.e[e]);
                    }
                    uint32_t re = rb;
#pragma unroll
                    for (int e = 0; e < V; ++e) {
                        const uint32_t x = x0 + e;
                        uint32_t rj = re;
#pragma unroll
                        for (int jj = 0; jj < kJChunk; ++jj) {
                            if (j0 + jj < p.nx) {
                                const float2 t = twiddle(sm.tx, use_tab, rj, W);
                                c[jj] = fmaf(hv[e], t.x, c[jj]);
                                s[jj] = fmaf(hv[e], t.y, s[jj]);
                                rj = addmod(rj, x, W);
                            }
                        }
                        re = addmod(re, kc, W);
                    }
                    rb = addmod(rb, r_step, W);
                }
            }
#pragma unroll
            for (int jj = 0; jj < kJChunk; ++jj) {
                c[jj] = lane_group_sum(c[jj], L);
                s[jj] = lane_group_sum(s[jj], L);
            }
            if (valid && sub == 0) {
#pragma unroll
                for (int jj = 0; jj < kJChunk; ++jj)
                    if (j0 + jj < p.nx)
                        sm.rs[(static_cast<uint32_t>(g) * p.tile_rows + yy) * p.nx + j0 + jj] = make_float2(c[jj], s[jj]);
            }
        }
    }
}

// Phase C: (R_ij, I_ij) += sum over the tile's rows, weighted by w_ij. Item (g, i, j) belongs to the same
// lane group in every tile (item = group_id + it * n_groups), so the += needs no atomics and the
// summation order is fixed: results are bitwise reproducible.
template <bool TAB>
__device__ void column_sums(const KernelParams& p, const FilterSmem& sm, int g_eff, uint32_t y_lo, uint32_t rows,
                            float wscale) {
    const uint32_t H = static_cast<uint32_t>(p.H);
    const int L = p.lanes_col;
    const int sub = threadIdx.x & (L - 1);
    const int n_groups = kThreads / L;
    const int group_id = threadIdx.x / L;
    const uint32_t per_plane = static_cast<uint32_t>(p.ny * p.nx);
    const uint32_t items = static_cast<uint32_t>(g_eff) * per_plane;
    const uint32_t iters = (items + n_groups - 1) / n_groups;
    constexpr bool use_tab = TAB;  // p.use_tab, a template parameter: the hot loops hold one twiddle source
#pragma unroll 1
    for (uint32_t it = 0; it < iters; ++it) {
        const uint32_t item = group_id + it * n_groups;
        const bool valid = item < items;
        float re = 0.0f, im = 0.0f;
        const uint32_t g = valid ? item / per_plane : 0u;
        const uint32_t ij = valid ? item - g * per_plane : 0u;
        const int i = static_cast<int>(ij / p.nx);
        const int j = static_cast<int>(ij - i * p.nx);
        if (valid && static_cast<uint32_t>(sub) < rows) {
            const uint32_t ky = posmod(static_cast<int64_t>(p.ky0) + i, H);
            uint32_t ry = mulmod(ky, y_lo + sub, H);
            const uint32_t r_step = mulmod(ky, static_cast<uint32_t>(L) % H, H);
#pragma unroll 1
            for (uint32_t yy = sub; yy < rows; yy += L) {
                const float2 cs = sm.rs[(g * p.tile_rows + yy) * p.nx + j];
                const float2 t = twiddle(sm.ty, use_tab, ry, H);
                re = fmaf(cs.x, t.x, fmaf(-cs.y, t.y, re));
                im = fmaf(cs.y, t.x, fmaf(cs.x, t.y, im));
                ry = addmod(ry, r_step, H);
            }
        }
        re = lane_group_sum(re, L);
        im = lane_group_sum(im, L);
        if (valid && sub == 0) {
            const int64_t ky = static_cast<int64_t>(p.ky0) + i, kx = static_cast<int64_t>(p.kx0) + j;
            const bool inside = !p.radial || ky * ky + kx * kx < p.radius_sq;
            const float w = inside ? wscale : 0.0f;
            float2& acc = sm.ri[g * per_plane + ij];
            acc.x = fmaf(w, re, acc.x);
            acc.y = fmaf(w, im, acc.y);
        }
    }
}

// Phase D: (Uc_j[y], Us_j[y]) for the tile's rows, overwriting the row sums (consumed by phase C).
template <bool TAB>
__device__ void row_updates(const KernelParams& p, const FilterSmem& sm, int g_eff, uint32_t y_lo, uint32_t rows) {
    const uint32_t H = static_cast<uint32_t>(p.H);
    const uint32_t per_g = rows * static_cast<uint32_t>(p.nx);
    const uint32_t items = static_cast<uint32_t>(g_eff) * per_g;
    const uint32_t k0 = posmod(p.ky0, H);
    constexpr bool use_tab = TAB;  // p.use_tab, a template parameter: the hot loops hold one twiddle source
#pragma unroll 1
    for (uint32_t item = threadIdx.x; item < items; item += kThreads) {
        const uint32_t g = item / per_g;
        const uint32_t rem = item - g * per_g;
        const uint32_t yy = rem / p.nx;
        const uint32_t j = rem - yy * p.nx;
        const uint32_t y = y_lo + yy;
        uint32_t ry = mulmod(k0, y, H);  // ((ky0 + i) y) mod H, advanced by y per i
        float uc = 0.0f, us = 0.0f;
        const float2* q = sm.ri + g * p.ny * p.nx + j;
#pragma unroll 1
        for (int i = 0; i < p.ny; ++i) {
            const float2 qi = q[i * p.nx];
            const float2 t = twiddle(sm.ty, use_tab, ry, H);
            uc = fmaf(qi.x, t.x, fmaf(qi.y, t.y, uc));
            us = fmaf(qi.y, t.x, fmaf(-qi.x, t.y, us));
            ry = addmod(ry, y, H);
        }
        sm.rs[(g * p.tile_rows + yy) * p.nx + j] = make_float2(uc, us);
    }
}

// Phase E: out = g_hi h + sum_j Uc_j[y] cos(bx_j) + Us_j[y] sin(bx_j) for the tile's elements, h read
// from shared memory (on chip) or again from global memory (two sweeps; the re-read hits L2).
template <typename T, int V, bool ON_CHIP, bool CL, bool TAB>
__device__ void write_outputs(const KernelParams& p, const FilterSmem& sm, int g_eff, uint32_t y_lo, uint32_t rows) {
    const RoleParams& r = p.sk;
    const T* __restrict__ src = static_cast<const T*>(r.src);
    T* __restrict__ dst = static_cast<T*>(r.dst);
    const T* plane = static_cast<const T*>(sm.plane);
    const uint32_t W = static_cast<uint32_t>(p.W);
    const uint32_t nvec = static_cast<uint32_t>(g_eff) * rows * W / V;
    constexpr bool cl = ON_CHIP && CL;
    constexpr bool use_tab = TAB;  // p.use_tab, a template parameter: the hot loops hold one twiddle source
    const uint32_t kxm = posmod(p.kx0, W);
    const float ghi = p.high_gain;
    const int nx = p.nx;
#pragma unroll 1
    for (uint32_t v = threadIdx.x; v < nvec; v += kThreads) {
        const Coord co = tile_coord(cl, v * V, g_eff, rows, W, y_lo);
        const uint32_t yy = co.y - y_lo;
        float hv[V];
        if (ON_CHIP) {
            const uint32_t at = static_cast<uint32_t>(co.g) * p.pitch + co.y * W + co.x;
            if (cl) {
#pragma unroll
                for (int e = 0; e < V; ++e) hv[e] = Cvt<T>::in(plane[at + e * p.pitch]);
            } else {
                const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(plane + at);
#pragma unroll
                for (int e = 0; e < V; ++e) hv[e] = Cvt<T>::in(pk.e[e]);
            }
        } else {
            const Pack<T, V> pk =
                *reinterpret_cast<const Pack<T, V>*>(src + sm.info[co.g].src + co.y * r.ss[3] + co.x * r.ss[4]);
#pragma unroll
            for (int e = 0; e < V; ++e) hv[e] = Cvt<T>::in(pk.e[e]);
        }
        float acc[V];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = ghi * hv[e];
        if (cl) {
            // V planes at one (y, x): one twiddle per frequency, one (Uc, Us) per plane.
            uint32_t rx = mulmod(kxm, co.x, W);
#pragma unroll 1
            for (int j = 0; j < nx; ++j) {
                const float2 t = twiddle(sm.tx, use_tab, rx, W);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const float2 u = sm.rs[((static_cast<uint32_t>(co.g) + e) * p.tile_rows + yy) * nx + j];
                    acc[e] = fmaf(u.x, t.x, fmaf(u.y, t.y, acc[e]));
                }
                rx = addmod(rx, co.x, W);
            }
        } else {
            // V consecutive x of one row: one (Uc, Us) per frequency, one twiddle per element.
            uint32_t rx[V];
            rx[0] = mulmod(kxm, co.x, W);
#pragma unroll
            for (int e = 1; e < V; ++e) rx[e] = addmod(rx[e - 1], kxm, W);
            const float2* u_row = sm.rs + (static_cast<uint32_t>(co.g) * p.tile_rows + yy) * nx;
#pragma unroll 1
            for (int j = 0; j < nx; ++j) {
                const float2 u = u_row[j];
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const float2 t = twiddle(sm.tx, use_tab, rx[e], W);
                    acc[e] = fmaf(u.x, t.x, fmaf(u.y, t.y, acc[e]));
                    rx[e] = addmod(rx[e], co.x + e, W);
                }
            }
        }
        Pack<T, V> o;
#pragma unroll
        for (int e = 0; e < V; ++e) o.e[e] = Cvt<T>::out(acc[e]);
        *reinterpret_cast<Pack<T, V>*>(dst + sm.info[co.g].dst + co.y * r.ds[3] + co.x * r.ds[4]) = o;
    }
}

template <typename T, int V, bool ON_CHIP, bool CL, bool TAB>
__device__ void filter_sweeps(const KernelParams& p, const FilterSmem& sm, int g_eff, float wscale) {
    const uint32_t H = static_cast<uint32_t>(p.H);
    const uint32_t tile = static_cast<uint32_t>(p.tile_rows);
    // Sweep 1: moments, tile by tile (on chip: one tile holding every row).
#pragma unroll 1
    for (uint32_t y_lo = 0; y_lo < H; y_lo += tile) {
        const uint32_t rows = min(tile, H - y_lo);
        row_sums<T, ON_CHIP ? 1 : V, ON_CHIP, TAB>(p, sm, g_eff, y_lo, rows);
        __syncthreads();
        column_sums<TAB>(p, sm, g_eff, y_lo, rows, wscale);
        __syncthreads();
    }
    // Sweep 2: every plane's reduction is complete; write the filtered planes.
#pragma unroll 1
    for (uint32_t y_lo = 0; y_lo < H; y_lo += tile) {
        const uint32_t rows = min(tile, H - y_lo);
        row_updates<TAB>(p, sm, g_eff, y_lo, rows);
        __syncthreads();
        write_outputs<T, V, ON_CHIP, CL, TAB>(p, sm, g_eff, y_lo, rows);
        if (y_lo + tile < H) __syncthreads();  // the next tile's phase D overwrites the (Uc, Us) rows
    }
}

// One specialisation of the generic filter: V = 16-byte vectors or 1 (scalar), planes staged on chip or
// swept twice, channels-last staging order (on chip only: a two-sweep block holds one plane, walked
// through its strides), twiddles from shared tables (TAB = p.use_tab) or computed. Every loop is a
// runtime loop kept rolled (`unroll 1`), one SASS loop per source loop: bench/codegen counts each by
// its trip count from the launch plan (cuda_target._filter_iterations).
template <typename T, int V, bool ON_CHIP, bool CL, bool TAB>
__device__ void filter_variant(const KernelParams& p, int64_t task, unsigned char* smem) {
    const RoleParams& r = p.sk;
    FilterSmem sm;
    sm.info = reinterpret_cast<PlaneInfo*>(smem);
    sm.tx = reinterpret_cast<float2*>(smem + p.off_tx);
    sm.ty = reinterpret_cast<float2*>(smem + p.off_ty);
    sm.ri = reinterpret_cast<float2*>(smem + p.off_ri);
    sm.rs = reinterpret_cast<float2*>(smem + p.off_rs);
    sm.plane = smem + p.off_plane;
    const int64_t group = task;  // the filter has one task per group
    const int g_eff = group_size(p, r, group);
    fill_plane_info(p, r, 2, group, g_eff, sm.info);
    const uint32_t H = static_cast<uint32_t>(p.H), W = static_cast<uint32_t>(p.W);
    if (TAB) {
#pragma unroll 1
        for (uint32_t i = threadIdx.x; i < W; i += kThreads) sm.tx[i] = twiddle_direct(i, W);
#pragma unroll 1
        for (uint32_t i = threadIdx.x; i < H; i += kThreads) sm.ty[i] = twiddle_direct(i, H);
    }
#pragma unroll 1
    for (int i = threadIdx.x; i < g_eff * p.ny * p.nx; i += kThreads) sm.ri[i] = make_float2(0.0f, 0.0f);
    // w = (s - g_hi) / (H W), formed in double so a large plane loses nothing before the final rounding.
    const float wscale = static_cast<float>((static_cast<double>(read_factor(p.s)) - static_cast<double>(p.high_gain)) /
                                            (static_cast<double>(p.H) * static_cast<double>(p.W)));
    __syncthreads();  // plane info visible to the staging loop
    if (ON_CHIP) {
        stage_planes<T, V, CL>(p, sm, g_eff);
        __syncthreads();
    }
    filter_sweeps<T, V, ON_CHIP, CL, TAB>(p, sm, g_eff, wscale);
}

template <typename T, bool TAB>
__device__ void filter_dispatch(const KernelParams& p, int64_t task, unsigned char* smem) {
    constexpr int V = 16 / sizeof(T);
    const bool vec = p.sk.vec != 0;
    if (p.on_chip) {
        if (p.cl) {
            if (vec) filter_variant<T, V, true, true, TAB>(p, task, smem);
            else filter_variant<T, 1, true, true, TAB>(p, task, smem);
        } else {
            if (vec) filter_variant<T, V, true, false, TAB>(p, task, smem);
            else filter_variant<T, 1, true, false, TAB>(p, task, smem);
        }
    } else {  // one plane per block, walked through its strides whatever the layout
        if (vec) filter_variant<T, V, false, false, TAB>(p, task, smem);
        else filter_variant<T, 1, false, false, TAB>(p, task, smem);
    }
}

template <typename T>
__device__ void filter_task(const KernelParams& p, int64_t task, unsigned char* smem) {
    if (p.use_tab) filter_dispatch<T, true>(p, task, smem);
    else filter_dispatch<T, false>(p, task, smem);
}


// ------------------------------------------------------------------------------------------------
// The register-tile filter: contiguous rows of 16-byte vectors, nx = ny = NF <= kTileMaxFreq.
// ------------------------------------------------------------------------------------------------

// A block holds tile_planes planes; each plane belongs to Tp = H L / R consecutive threads (R = kTileRows).
// Thread (row group rg, lane l) owns the column chunk x in [l V, l V + V) of the R rows y_r = rg + r H / R:
// all R vectors are loaded before any use, and the columns' twiddles are shared by the R rows.
//   partial row sums: in-thread FMAs over the chunk (Cr, Sr of the chunk's columns only);
//   moments:          R_ij, I_ij are linear in the row sums, so each thread forms them from its partial
//                     row sums and one butterfly over the plane's lanes of the warp (log2 min(Tp, 32)
//                     levels of 2 NF^2 values) plus a fixed-order sum over the plane's warps completes them;
//   row updates and the write: in registers, from the R rows held since the load.
// CENTRED (kx0 = ky0 = -(NF / 2): the box of threshold 1, the radial masks) puts frequency 0 at index NF / 2
// of both axes, whose twiddles are (1, 0): those terms are additions, with no table read.
// A plane's sums only ever combine lanes of that plane: a NaN stays in its plane.

// Twiddle tables of the register-tile filter, one row per frequency (no residue arithmetic in the hot
// code): tx[j W + x] = (cos, sin)(bx_j(x)), ty[i H + y] = (cos, sin)(ay_i(y)); the rows of frequency 0 of
// a centred band are never read and not written. Returns the shared bytes used (16-byte aligned).
template <int NF, bool CENTRED>
__device__ __forceinline__ uint32_t tile_tables(const KernelParams& p, float2* tx) {
    constexpr int Z = CENTRED ? NF / 2 : -1;
    const uint32_t H = static_cast<uint32_t>(p.H), W = static_cast<uint32_t>(p.W);
    float2* ty = tx + NF * W;
#pragma unroll 1
    for (uint32_t i = threadIdx.x; i < W + H; i += kThreads) {
        const bool along_x = i < W;
        const uint32_t pos = along_x ? i : i - W, size = along_x ? W : H;
        float2* row = along_x ? tx + pos : ty + pos;
        uint32_t res = mulmod(along_x ? p.kx_res : p.ky_res, pos, size);  // ((k0 + j) pos) mod size
#pragma unroll
        for (int j = 0; j < NF; ++j) {
            if (j != Z) row[j * size] = twiddle_direct(res, size);
            res = addmod(res, pos, size);
        }
    }
    return align16_dev(8 * NF * (W + H));
}

// The filter of the R rows x V columns a thread holds (hv, float32), written to acc: everything after the
// load, for both tile variants. `tx` holds the tables (tile_tables), `partial` the cross-warp moments.
// Starts with a barrier (the tables, and whatever the caller staged, become visible).
template <typename T, int NF, bool CENTRED>
__device__ __forceinline__ void tile_filter_rows(const KernelParams& p, const float2* tx, float2* partial,
                                                 uint32_t g, uint32_t rg, uint32_t x0,
                                                 const float (&hv)[kTileRows][16 / sizeof(T)],
                                                 float (&acc)[kTileRows][16 / sizeof(T)]) {
    constexpr int V = 16 / sizeof(T);
    constexpr int R = kTileRows;
    constexpr int Z = CENTRED ? NF / 2 : -1;  // index of frequency 0 on both axes
    const uint32_t H = static_cast<uint32_t>(p.H), W = static_cast<uint32_t>(p.W);
    const uint32_t tid = threadIdx.x;
    const uint32_t Tp = static_cast<uint32_t>(p.tile_threads);
    const uint32_t row_step = H / R;
    const float2* ty = tx + NF * W;
    // w = (s - g_hi) / (H W), formed in double so a large plane loses nothing before the final rounding.
    const float wscale =
        static_cast<float>((static_cast<double>(read_factor(p.s)) - static_cast<double>(p.high_gain)) * p.inv_area);
    __syncthreads();

    // Partial row sums Cr_j, Sr_j over the chunk's columns, twiddles read two columns per 16-byte access.
    float cr[R][NF], sr[R][NF];
#pragma unroll
    for (int j = 0; j < NF; ++j) {
#pragma unroll
        for (int rr = 0; rr < R; ++rr) cr[rr][j] = sr[rr][j] = 0.0f;
        if (j == Z) {  // (cos, sin) = (1, 0)
#pragma unroll
            for (int rr = 0; rr < R; ++rr)
#pragma unroll
                for (int e = 0; e < V; ++e) cr[rr][j] += hv[rr][e];
            continue;
        }
        const float4* t4 = reinterpret_cast<const float4*>(tx + j * W + x0);  // W, x0 even: 16-byte aligned
#pragma unroll
        for (int e2 = 0; e2 < V / 2; ++e2) {
            const float4 t = t4[e2];
#pragma unroll
            for (int rr = 0; rr < R; ++rr) {
                cr[rr][j] = fmaf(hv[rr][2 * e2], t.x, cr[rr][j]);
                sr[rr][j] = fmaf(hv[rr][2 * e2], t.y, sr[rr][j]);
                cr[rr][j] = fmaf(hv[rr][2 * e2 + 1], t.z, cr[rr][j]);
                sr[rr][j] = fmaf(hv[rr][2 * e2 + 1], t.w, sr[rr][j]);
            }
        }
    }

    // Partial moments over this thread's rows y_r = rg + r H / R:
    // R_ij += Cr_j cos(ay_i) - Sr_j sin(ay_i), I_ij += Sr_j cos(ay_i) + Cr_j sin(ay_i).
    float mr[NF][NF], mi[NF][NF];
#pragma unroll
    for (int i = 0; i < NF; ++i) {
#pragma unroll
        for (int j = 0; j < NF; ++j) mr[i][j] = mi[i][j] = 0.0f;
#pragma unroll
        for (int rr = 0; rr < R; ++rr) {
            if (i == Z) {
#pragma unroll
                for (int j = 0; j < NF; ++j) {
                    mr[i][j] += cr[rr][j];
                    mi[i][j] += sr[rr][j];
                }
                continue;
            }
            const float2 t = ty[i * H + rg + rr * row_step];
#pragma unroll
            for (int j = 0; j < NF; ++j) {
                mr[i][j] = fmaf(cr[rr][j], t.x, fmaf(-sr[rr][j], t.y, mr[i][j]));
                mi[i][j] = fmaf(sr[rr][j], t.x, fmaf(cr[rr][j], t.y, mi[i][j]));
            }
        }
    }
    // Sum over the plane's lanes: a butterfly within the warp, then a fixed-order sum over its warps.
    const uint32_t warp_span = min(Tp, 32u);
#pragma unroll 1
    for (uint32_t off = 1; off < warp_span; off <<= 1) {
#pragma unroll
        for (int i = 0; i < NF; ++i)
#pragma unroll
            for (int j = 0; j < NF; ++j) {
                mr[i][j] += __shfl_xor_sync(0xffffffffu, mr[i][j], static_cast<int>(off));
                mi[i][j] += __shfl_xor_sync(0xffffffffu, mi[i][j], static_cast<int>(off));
            }
    }
    if (Tp > 32u) {
        const uint32_t warp = tid >> 5;
        if ((tid & 31u) == 0u) {
#pragma unroll
            for (int i = 0; i < NF; ++i)
#pragma unroll
                for (int j = 0; j < NF; ++j) partial[warp * NF * NF + i * NF + j] = make_float2(mr[i][j], mi[i][j]);
        }
        __syncthreads();
        const uint32_t w_first = (g * Tp) >> 5, w_end = w_first + (Tp >> 5);
#pragma unroll
        for (int i = 0; i < NF; ++i)
#pragma unroll
            for (int j = 0; j < NF; ++j) mr[i][j] = mi[i][j] = 0.0f;
#pragma unroll 1
        for (uint32_t w = w_first; w < w_end; ++w) {
#pragma unroll
            for (int i = 0; i < NF; ++i)
#pragma unroll
                for (int j = 0; j < NF; ++j) {
                    const float2 m = partial[w * NF * NF + i * NF + j];
                    mr[i][j] += m.x;
                    mi[i][j] += m.y;
                }
        }
    }
    // Weights: Q_ij = w_ij (R_ij, I_ij), w_ij = (s - g_hi) / (H W) inside the mask, else 0.
#pragma unroll
    for (int i = 0; i < NF; ++i)
#pragma unroll
        for (int j = 0; j < NF; ++j) {
            const float w = (p.tile_mask >> (i * NF + j)) & 1u ? wscale : 0.0f;
            mr[i][j] *= w;
            mi[i][j] *= w;
        }

    // Row updates Uc_j[y] = sum_i Qr_ij cos(ay_i) + Qi_ij sin(ay_i), Us_j[y] = sum_i Qi_ij cos - Qr_ij sin.
    float uc[R][NF], us[R][NF];
#pragma unroll
    for (int rr = 0; rr < R; ++rr)
#pragma unroll
        for (int j = 0; j < NF; ++j) {
            uc[rr][j] = Z >= 0 ? mr[Z < 0 ? 0 : Z][j] : 0.0f;
            us[rr][j] = Z >= 0 ? mi[Z < 0 ? 0 : Z][j] : 0.0f;
        }
#pragma unroll
    for (int i = 0; i < NF; ++i) {
        if (i == Z) continue;
#pragma unroll
        for (int rr = 0; rr < R; ++rr) {
            const float2 t = ty[i * H + rg + rr * row_step];
#pragma unroll
            for (int j = 0; j < NF; ++j) {
                uc[rr][j] = fmaf(mr[i][j], t.x, fmaf(mi[i][j], t.y, uc[rr][j]));
                us[rr][j] = fmaf(mi[i][j], t.x, fmaf(-mr[i][j], t.y, us[rr][j]));
            }
        }
    }

    // Write: out = g_hi h + sum_j Uc_j[y] cos(bx_j) + Us_j[y] sin(bx_j).
    const float ghi = p.high_gain;
#pragma unroll
    for (int rr = 0; rr < R; ++rr)
#pragma unroll
        for (int e = 0; e < V; ++e) acc[rr][e] = Z >= 0 ? fmaf(ghi, hv[rr][e], uc[rr][Z < 0 ? 0 : Z]) : ghi * hv[rr][e];
#pragma unroll
    for (int j = 0; j < NF; ++j) {
        if (j == Z) continue;
        const float4* t4 = reinterpret_cast<const float4*>(tx + j * W + x0);
#pragma unroll
        for (int e2 = 0; e2 < V / 2; ++e2) {
            const float4 t = t4[e2];
#pragma unroll
            for (int rr = 0; rr < R; ++rr) {
                acc[rr][2 * e2] = fmaf(uc[rr][j], t.x, fmaf(us[rr][j], t.y, acc[rr][2 * e2]));
                acc[rr][2 * e2 + 1] = fmaf(uc[rr][j], t.z, fmaf(us[rr][j], t.w, acc[rr][2 * e2 + 1]));
            }
        }
    }
}

// A thread's place in the register tile: plane g of the block, row group rg (rows rg + r H / R), columns
// [x0, x0 + V).
struct TileLane {
    uint32_t g, rg, x0;
};

__device__ __forceinline__ TileLane tile_lane(const KernelParams& p, int V) {
    const uint32_t tp = threadIdx.x & static_cast<uint32_t>(p.tile_threads - 1);
    return TileLane{threadIdx.x >> p.tile_log2_threads, tp >> p.tile_log2_lanes,
                    (tp & static_cast<uint32_t>(p.tile_lanes - 1)) * static_cast<uint32_t>(V)};
}

// Planar register tile: block = tile_planes planes of the skip role, each thread's R row chunks loaded
// from global memory straight into registers and the results stored from them.
template <typename T, int NF, bool CENTRED>
__device__ void tile_filter_task(const KernelParams& p, int64_t task, unsigned char* smem) {
    constexpr int V = 16 / sizeof(T);
    constexpr int R = kTileRows;
    const RoleParams& r = p.sk;
    const TileLane ln = tile_lane(p, V);
    const uint32_t g = ln.g, rg = ln.rg, x0 = ln.x0;
    const uint32_t row_step = static_cast<uint32_t>(p.H) / R;
    const uint32_t plane_raw = static_cast<uint32_t>(task) * static_cast<uint32_t>(p.tile_planes) + g;
    const bool valid = plane_raw < static_cast<uint32_t>(r.planes);
    // A block's last planes may not exist: those lanes read the last plane (their sums stay in their own
    // lanes) and store nothing.
    const uint32_t plane = valid ? plane_raw : static_cast<uint32_t>(r.planes) - 1u;
    const uint32_t q = fast_div(plane, p.div_f);
    const uint32_t f = plane - q * p.div_f.d;
    const uint32_t n = fast_div(q, p.div_c);
    const uint32_t c = q - n * p.div_c.d;
    const T* __restrict__ src = static_cast<const T*>(r.src) + (n * r.ss[0] + c * r.ss[1] + f * r.ss[2] + rg * r.ss[3] + x0);
    T* __restrict__ dst = static_cast<T*>(r.dst) + (n * r.ds[0] + c * r.ds[1] + f * r.ds[2] + rg * r.ds[3] + x0);
    const int64_t src_row = row_step * r.ss[3], dst_row = row_step * r.ds[3];
    Pack<T, V> in[R];
#pragma unroll
    for (int rr = 0; rr < R; ++rr) in[rr] = *reinterpret_cast<const Pack<T, V>*>(src + rr * src_row);
    float2* tx = reinterpret_cast<float2*>(smem);  // tables built while the loads are in flight
    float2* partial = reinterpret_cast<float2*>(smem + tile_tables<NF, CENTRED>(p, tx));
    float hv[R][V], acc[R][V];
#pragma unroll
    for (int rr = 0; rr < R; ++rr)
#pragma unroll
        for (int e = 0; e < V; ++e) hv[rr][e] = Cvt<T>::in(in[rr].e[e]);
    tile_filter_rows<T, NF, CENTRED>(p, tx, partial, g, rg, x0, hv, acc);
    if (valid) {
#pragma unroll
        for (int rr = 0; rr < R; ++rr) {
            Pack<T, V> o;
#pragma unroll
            for (int e = 0; e < V; ++e) o.e[e] = Cvt<T>::out(acc[rr][e]);
            *reinterpret_cast<Pack<T, V>*>(dst + rr * dst_row) = o;
        }
    }
}

// Channels-last register tile: block = tile_planes consecutive channels (whole channel vectors) of one
// (n, f). Global memory is read and written in 16-byte channel vectors (coalesced: consecutive threads,
// consecutive vectors of a pixel); shared memory turns them into planes and back. Each thread moves
// exactly R vectors each way (tile_planes H W = kThreads R V), so every loop is unrolled.
template <typename T, int NF, bool CENTRED>
__device__ void tile_filter_task_cl(const KernelParams& p, int64_t task, unsigned char* smem) {
    constexpr int V = 16 / sizeof(T);
    constexpr int R = kTileRows;
    const RoleParams& r = p.sk;
    const uint32_t tid = threadIdx.x;
    const uint32_t HW = static_cast<uint32_t>(p.H * p.W), pitch = HW + V;  // +16 bytes: spreads banks
    const uint32_t nf = fast_div(static_cast<uint32_t>(task), p.div_c);  // div_c: channel groups per (n, f)
    const uint32_t c0 = (static_cast<uint32_t>(task) - nf * p.div_c.d) * static_cast<uint32_t>(p.tile_planes);
    const uint32_t n = fast_div(nf, p.div_f);
    const uint32_t f = nf - n * p.div_f.d;
    const T* __restrict__ src = static_cast<const T*>(r.src) + (n * r.ss[0] + f * r.ss[2] + c0);
    T* __restrict__ dst = static_cast<T*>(r.dst) + (n * r.ds[0] + f * r.ds[2] + c0);
    T* planes = reinterpret_cast<T*>(smem);
    const uint32_t cvec_mask = (1u << p.tile_log2_cvecs) - 1u, w_mask = static_cast<uint32_t>(p.W) - 1u;
    uint32_t off[R];  // element offset of each vector's channel 0 in shared memory
    bool live[R];
    Pack<T, V> in[R];
#pragma unroll
    for (int k = 0; k < R; ++k) {
        const uint32_t v = tid + k * kThreads;
        const uint32_t cv = v & cvec_mask, pos = v >> p.tile_log2_cvecs;
        const uint32_t y = pos >> p.tile_log2_w, x = pos & w_mask;
        off[k] = cv * V * pitch + pos;
        live[k] = c0 + cv * V < static_cast<uint32_t>(r.channels);
        if (live[k]) in[k] = *reinterpret_cast<const Pack<T, V>*>(src + y * r.ss[3] + x * r.ss[4] + cv * V);
    }
    const uint32_t planes_bytes = align16_dev(static_cast<uint32_t>(p.tile_planes) * pitch * sizeof(T));
    float2* tx = reinterpret_cast<float2*>(smem + planes_bytes);
    float2* partial = reinterpret_cast<float2*>(smem + planes_bytes + tile_tables<NF, CENTRED>(p, tx));
#pragma unroll
    for (int k = 0; k < R; ++k)
        if (live[k]) {
#pragma unroll
            for (int e = 0; e < V; ++e) planes[off[k] + e * pitch] = in[k].e[e];
        }
    __syncthreads();
    // The planar tile's thread layout over the staged planes.
    const TileLane ln = tile_lane(p, V);
    const uint32_t g = ln.g, rg = ln.rg, x0 = ln.x0;
    const uint32_t row_step = static_cast<uint32_t>(p.H) / R;
    T* mine = planes + g * pitch + rg * static_cast<uint32_t>(p.W) + x0;
    float hv[R][V], acc[R][V];
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
        const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(mine + rr * row_step * static_cast<uint32_t>(p.W));
#pragma unroll
        for (int e = 0; e < V; ++e) hv[rr][e] = Cvt<T>::in(pk.e[e]);
    }
    tile_filter_rows<T, NF, CENTRED>(p, tx, partial, g, rg, x0, hv, acc);
    // In place: every thread overwrites only the chunk it read (read before the barrier in tile_filter_rows).
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
        Pack<T, V> o;
#pragma unroll
        for (int e = 0; e < V; ++e) o.e[e] = Cvt<T>::out(acc[rr][e]);
        *reinterpret_cast<Pack<T, V>*>(mine + rr * row_step * static_cast<uint32_t>(p.W)) = o;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < R; ++k) {
        if (!live[k]) continue;
        const uint32_t v = tid + k * kThreads;
        const uint32_t cv = v & cvec_mask, pos = v >> p.tile_log2_cvecs;
        const uint32_t y = pos >> p.tile_log2_w, x = pos & w_mask;
        Pack<T, V> o;
#pragma unroll
        for (int e = 0; e < V; ++e) o.e[e] = planes[off[k] + e * pitch];
        *reinterpret_cast<Pack<T, V>*>(dst + y * r.ds[3] + x * r.ds[4] + cv * V) = o;
    }
}

template <typename T, int NF, bool CENTRED>
__device__ __forceinline__ void tile_variant(const KernelParams& p, int64_t task, unsigned char* smem) {
    if (p.cl) tile_filter_task_cl<T, NF, CENTRED>(p, task, smem);
    else tile_filter_task<T, NF, CENTRED>(p, task, smem);
}

// ------------------------------------------------------------------------------------------------
// The channel-vector filter: channels-last planes the register tile cannot stage (64x64 and up), bands of
// nx = ny = NF <= kTileMaxFreq. One block per (n, f, CV 16-byte channel vectors = CH channels).
// ------------------------------------------------------------------------------------------------

// Thread (pixel lane l, vector s) reads channel vector s of pixels of row y = pass + l / LPR, columns
// x = l mod LPR + m LPR: a warp reads 32 / CV pixels x 16 CV contiguous bytes (CV = 2: whole sectors).
//   sweep 1: row sums Cr_j, Sr_j of the thread's columns in registers (kClvUnroll loads in flight), a
//            butterfly over the row's LPR lanes, stored per (y, j, channel) in shared memory;
//   moments: (R_ij, I_ij) per channel by lane groups over the rows, weighted: Q_ij;
//   updates: (Uc_j[y], Us_j[y]) per channel, overwriting the row sums;
//   sweep 2: the pixels are read again (from L2: the block read them a moment ago) and
//            out = g_hi h + sum_j Uc_j cos(bx_j) + Us_j sin(bx_j) written as 16-byte vectors.
// Twiddles come from tile_tables (exact residues); a CENTRED band's frequency-0 terms are additions.
// Walks a row's pixels x = xl + m lpr < W (one thread's columns), U 16-byte loads issued before any is
// used, and calls use(vector, x) for each pixel in order.
template <typename T, int V, int U, typename Use>
__device__ __forceinline__ void clvec_row(const T* row, uint32_t xl, uint32_t lpr, uint32_t W, int64_t sp,
                                          Use&& use) {
#pragma unroll 1
    for (uint32_t x0 = xl; x0 < W; x0 += lpr * U) {
        Pack<T, V> in[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint32_t x = x0 + u * lpr;
            if (x < W) in[u] = *reinterpret_cast<const Pack<T, V>*>(row + x * sp);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint32_t x = x0 + u * lpr;
            if (x < W) use(in[u], x);
        }
    }
}

template <typename T, int NF, bool CENTRED>
__device__ void clvec_filter_task(const KernelParams& p, int64_t task, unsigned char* smem) {
    constexpr int V = 16 / sizeof(T);
    constexpr int Z = CENTRED ? NF / 2 : -1;  // index of frequency 0 on both axes
    // 16-byte pixel loads in flight per thread: 8 (128 bytes) for float; 4 for 16-bit types, whose 8
    // channels per vector need twice the row-sum registers (8 spill in bfloat16 at 128 registers).
    constexpr int kClvUnroll = V == 8 ? 4 : 8;
    const RoleParams& r = p.sk;
    const T* __restrict__ src = static_cast<const T*>(r.src);
    T* __restrict__ dst = static_cast<T*>(r.dst);
    const uint32_t t32 = static_cast<uint32_t>(task);
    const uint32_t nf = fast_div(t32, p.clv_groups);  // (n, f) of the block, then its channel group
    const uint32_t cg = t32 - nf * p.clv_groups.d;
    const uint32_t n = fast_div(nf, p.div_f), f = nf - n * p.div_f.d;
    const int log2cv = p.clv_log2_vecs, log2ch = log2cv + (V == 8 ? 3 : 2);
    const uint32_t CH = 1u << log2ch;
    const uint32_t sub = threadIdx.x & ((1u << log2cv) - 1u);
    const uint32_t lane_px = threadIdx.x >> log2cv;
    const uint32_t lpr = static_cast<uint32_t>(p.lanes_row);
    const uint32_t xl = lane_px & (lpr - 1u), row_in_pass = lane_px >> p.clv_log2_lpr;
    const uint32_t rows_per_pass = (static_cast<uint32_t>(kThreads) >> log2cv) >> p.clv_log2_lpr;
    const uint32_t c_own = sub * V;  // the thread's first channel within the block
    src += n * r.ss[0] + f * r.ss[2] + static_cast<int64_t>(cg) * CH + c_own;
    dst += n * r.ds[0] + f * r.ds[2] + static_cast<int64_t>(cg) * CH + c_own;
    const int64_t sp = r.ss[4], dp = r.ds[4];  // pixel q = y W + x at q * stride (dense rows: plan)
    const uint32_t H = static_cast<uint32_t>(p.H), W = static_cast<uint32_t>(p.W);
    float2* tx = reinterpret_cast<float2*>(smem);
    const float2* ty = tx + NF * W;
    float2* rs = reinterpret_cast<float2*>(smem + tile_tables<NF, CENTRED>(p, tx));  // [y][j][c]
    float2* q = rs + H * NF * CH;                                                    // [i][j][c]
    __syncthreads();  // the tables
    // Sweep 1: row sums.
#pragma unroll 1
    for (uint32_t y0 = 0; y0 < H; y0 += rows_per_pass) {  // block-uniform: the butterflies stay converged
        const uint32_t y = y0 + row_in_pass;
        float c[NF][V], s[NF][V];
#pragma unroll
        for (int j = 0; j < NF; ++j)
#pragma unroll
            for (int e = 0; e < V; ++e) c[j][e] = s[j][e] = 0.0f;
        if (y < H) {
            clvec_row<T, V, kClvUnroll>(src + static_cast<int64_t>(y) * W * sp, xl, lpr, W, sp,
                                        [&](const Pack<T, V>& in, uint32_t x) {
#pragma unroll
                for (int j = 0; j < NF; ++j) {
                    if (j == Z) {
#pragma unroll
                        for (int e = 0; e < V; ++e) c[j][e] += Cvt<T>::in(in.e[e]);
                    } else {
                        const float2 t = tx[j * W + x];
#pragma unroll
                        for (int e = 0; e < V; ++e) {
                            const float hv = Cvt<T>::in(in.e[e]);
                            c[j][e] = fmaf(hv, t.x, c[j][e]);
                            s[j][e] = fmaf(hv, t.y, s[j][e]);
                        }
                    }
                }
            });
        }
#pragma unroll 1
        for (uint32_t off = lpr >> 1; off > 0; off >>= 1) {  // the row's lanes: xor offsets CV .. CV LPR / 2
#pragma unroll
            for (int j = 0; j < NF; ++j)
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    c[j][e] += __shfl_xor_sync(0xffffffffu, c[j][e], static_cast<int>(off << log2cv));
                    if (j != Z) s[j][e] += __shfl_xor_sync(0xffffffffu, s[j][e], static_cast<int>(off << log2cv));
                }
        }
        if (y < H && xl == 0) {
#pragma unroll
            for (int j = 0; j < NF; ++j)
#pragma unroll
                for (int e = 0; e < V; ++e)
                    rs[(y * NF + j) * CH + c_own + e] = make_float2(c[j][e], j == Z ? 0.0f : s[j][e]);
        }
    }
    __syncthreads();
    // Moments: item (i, j, channel) = (i NF + j) CH + c, summed over the rows by lanes_col lanes.
    {
        const uint32_t items = NF * NF * CH;
        const uint32_t lc = static_cast<uint32_t>(p.lanes_col), groups = kThreads >> p.clv_log2_lc;
        const uint32_t gid = threadIdx.x >> p.clv_log2_lc, subc = threadIdx.x & (lc - 1u);
        const uint32_t iters = (items + groups - 1) / groups;
        const float wscale = static_cast<float>((static_cast<double>(read_factor(p.s)) -
                                                 static_cast<double>(p.high_gain)) * p.inv_area);
#pragma unroll 1
        for (uint32_t it = 0; it < iters; ++it) {
            const uint32_t item = gid + it * groups;
            const bool valid = item < items;
            const uint32_t ch = item & (CH - 1u), ij = item >> log2ch;
            const uint32_t i = ij / NF, j = ij - i * NF;
            float re = 0.0f, im = 0.0f;
            if (valid) {
#pragma unroll 1
                for (uint32_t yy = subc; yy < H; yy += lc) {
                    const float2 cs = rs[(yy * NF + j) * CH + ch];
                    const float2 t = static_cast<int>(i) == Z ? make_float2(1.0f, 0.0f) : ty[i * H + yy];
                    re = fmaf(cs.x, t.x, fmaf(-cs.y, t.y, re));
                    im = fmaf(cs.y, t.x, fmaf(cs.x, t.y, im));
                }
            }
#pragma unroll 1
            for (uint32_t off = lc >> 1; off > 0; off >>= 1) {
                re += __shfl_xor_sync(0xffffffffu, re, static_cast<int>(off));
                im += __shfl_xor_sync(0xffffffffu, im, static_cast<int>(off));
            }
            if (valid && subc == 0) {
                const float w = (p.tile_mask >> ij) & 1u ? wscale : 0.0f;  // bit i NF + j
                q[item] = make_float2(w * re, w * im);
            }
        }
    }
    __syncthreads();
    // Row updates (Uc_j[y], Us_j[y]) per channel, over the row sums (consumed above).
#pragma unroll 1
    for (uint32_t item = threadIdx.x; item < H * NF * CH; item += kThreads) {
        const uint32_t ch = item & (CH - 1u), yj = item >> log2ch;
        const uint32_t y = yj / NF, j = yj - y * NF;
        float uc = 0.0f, us = 0.0f;
#pragma unroll
        for (int i = 0; i < NF; ++i) {
            const float2 qi = q[(i * NF + j) * CH + ch];
            const float2 t = i == Z ? make_float2(1.0f, 0.0f) : ty[i * H + y];
            uc = fmaf(qi.x, t.x, fmaf(qi.y, t.y, uc));
            us = fmaf(qi.y, t.x, fmaf(-qi.x, t.y, us));
        }
        rs[item] = make_float2(uc, us);
    }
    __syncthreads();
    // Sweep 2: the write.
    const float ghi = p.high_gain;
#pragma unroll 1
    for (uint32_t y0 = 0; y0 < H; y0 += rows_per_pass) {
        const uint32_t y = y0 + row_in_pass;
        if (y >= H) continue;
        float2 upd[NF][V];
#pragma unroll
        for (int j = 0; j < NF; ++j)
#pragma unroll
            for (int e = 0; e < V; ++e) upd[j][e] = rs[(y * NF + j) * CH + c_own + e];
        T* out_row = dst + static_cast<int64_t>(y) * W * dp;
        clvec_row<T, V, kClvUnroll>(src + static_cast<int64_t>(y) * W * sp, xl, lpr, W, sp,
                                    [&](const Pack<T, V>& in, uint32_t x) {
            float acc[V];
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] = ghi * Cvt<T>::in(in.e[e]);
#pragma unroll
            for (int j = 0; j < NF; ++j) {
                if (j == Z) {
#pragma unroll
                    for (int e = 0; e < V; ++e) acc[e] += upd[j][e].x;
                } else {
                    const float2 t = tx[j * W + x];
#pragma unroll
                    for (int e = 0; e < V; ++e) acc[e] = fmaf(upd[j][e].x, t.x, fmaf(upd[j][e].y, t.y, acc[e]));
                }
            }
            Pack<T, V> o;
#pragma unroll
            for (int e = 0; e < V; ++e) o.e[e] = Cvt<T>::out(acc[e]);
            *reinterpret_cast<Pack<T, V>*>(out_row + x * dp) = o;
        });
    }
}

template <typename T, int NF, bool CENTRED, bool CLVEC>
__device__ __forceinline__ void band_task(const KernelParams& p, int64_t task, unsigned char* smem) {
    if (CLVEC) clvec_filter_task<T, NF, CENTRED>(p, task, smem);
    else tile_variant<T, NF, CENTRED>(p, task, smem);
}

// The register-tile (CLVEC false) and channel-vector filters are compiled per band: NF = nx = ny
// frequencies per axis, centred (frequency 0 at index NF / 2 of both axes) or not.
template <typename T, bool CLVEC>
__device__ void band_dispatch(const KernelParams& p, int64_t task, unsigned char* smem) {
    const bool centred = p.kx0 == -(p.nx / 2) && p.ky0 == -(p.ny / 2);
    switch (p.nx) {
        case 1:
            if (centred) band_task<T, 1, true, CLVEC>(p, task, smem);
            else band_task<T, 1, false, CLVEC>(p, task, smem);
            break;
        case 2:
            if (centred) band_task<T, 2, true, CLVEC>(p, task, smem);
            else band_task<T, 2, false, CLVEC>(p, task, smem);
            break;
        default:
            if (centred) band_task<T, 3, true, CLVEC>(p, task, smem);
            else band_task<T, 3, false, CLVEC>(p, task, smem);
            break;
    }
}

// ------------------------------------------------------------------------------------------------
// The kernel: blocks [0, sk.tasks) are skip tasks (the longer ones, scheduled first), the rest backbone.
// ------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) freeu_fused_concat_kernel(const __grid_constant__ KernelParams p) {
#ifdef FREEU_EMULATE
    unsigned char* smem = emu_shared_memory();
#else
    extern __shared__ __align__(16) unsigned char smem[];
#endif
    const int64_t task = blockIdx.x;
    if (task < p.sk.tasks) {
        switch (p.sk.path) {
            case kPathTile: band_dispatch<T, false>(p, task, smem); break;
            case kPathFlat: flat_dispatch<T>(p, p.sk, 1, task); break;
            case kPathClVectors: band_dispatch<T, true>(p, task, smem); break;
            case kPathPlanes: elementwise_task<T>(p, p.sk, 1, task, smem); break;
            default: filter_task<T>(p, task, smem); break;
        }
    } else if (p.bb.path == kPathFlat) {
        flat_dispatch<T>(p, p.bb, 0, task - p.sk.tasks);
    } else {
        elementwise_task<T>(p, p.bb, 0, task - p.sk.tasks, smem);
    }
}

#ifdef FREEU_CODEGEN
// Analysis only (bench/codegen): one __global__ per code path of the kernel above, calling the same device
// functions with the same parameters, so each path's SASS can be read and counted on its own.
template <typename T, int NF, bool CENTRED>
__global__ void __launch_bounds__(kThreads, 2) codegen_skip_tile(const __grid_constant__ KernelParams p) {
    extern __shared__ __align__(16) unsigned char smem[];
    tile_filter_task<T, NF, CENTRED>(p, blockIdx.x, smem);
}
template <typename T, int NF, bool CENTRED>
__global__ void __launch_bounds__(kThreads, 2) codegen_skip_tile_cl(const __grid_constant__ KernelParams p) {
    extern __shared__ __align__(16) unsigned char smem[];
    tile_filter_task_cl<T, NF, CENTRED>(p, blockIdx.x, smem);
}
template <typename T, int V, bool ON_CHIP, bool CL, bool TAB>
__global__ void __launch_bounds__(kThreads, 2) codegen_skip_filter(const __grid_constant__ KernelParams p) {
    extern __shared__ __align__(16) unsigned char smem[];
    filter_variant<T, V, ON_CHIP, CL, TAB>(p, blockIdx.x, smem);
}
template <typename T, int NF, bool CENTRED>
__global__ void __launch_bounds__(kThreads, 2) codegen_skip_clvec(const __grid_constant__ KernelParams p) {
    extern __shared__ __align__(16) unsigned char smem[];
    clvec_filter_task<T, NF, CENTRED>(p, blockIdx.x, smem);
}
template <typename T, bool CL, bool V2>
__global__ void __launch_bounds__(kThreads, 2) codegen_flat(const __grid_constant__ KernelParams p) {
    flat_task<T, CL, V2>(p, p.bb, 0, blockIdx.x);
}
template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads, 2) codegen_flat_skip(const __grid_constant__ KernelParams p) {
    flat_task<T, CL, false>(p, p.sk, 1, blockIdx.x);
}
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) codegen_planes(const __grid_constant__ KernelParams p) {
    extern __shared__ __align__(16) unsigned char smem[];
    elementwise_variant<T, V>(p, p.bb, 0, blockIdx.x, smem);
}
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) codegen_planes_skip(const __grid_constant__ KernelParams p) {
    extern __shared__ __align__(16) unsigned char smem[];
    elementwise_variant<T, V>(p, p.sk, 1, blockIdx.x, smem);
}
#define FREEU_CODEGEN_TYPE(T)                                                                         \
    template __global__ void codegen_skip_tile<T, 1, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_tile_cl<T, 1, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_tile<T, 1, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_tile_cl<T, 1, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_tile<T, 2, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_tile_cl<T, 2, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_tile<T, 2, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_tile_cl<T, 2, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_tile<T, 3, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_tile_cl<T, 3, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_tile<T, 3, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_tile_cl<T, 3, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 16 / sizeof(T), true, false, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 1, true, false, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 16 / sizeof(T), true, true, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 1, true, true, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 16 / sizeof(T), false, false, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 1, false, false, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 16 / sizeof(T), true, false, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 1, true, false, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 16 / sizeof(T), true, true, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 1, true, true, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 16 / sizeof(T), false, false, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_filter<T, 1, false, false, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_clvec<T, 1, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_clvec<T, 1, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_clvec<T, 2, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_clvec<T, 2, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_clvec<T, 3, false>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_skip_clvec<T, 3, true>(const __grid_constant__ KernelParams); \
    template __global__ void codegen_flat<T, false, false>(const __grid_constant__ KernelParams);                    \
    template __global__ void codegen_flat<T, false, true>(const __grid_constant__ KernelParams);                     \
    template __global__ void codegen_flat<T, true, false>(const __grid_constant__ KernelParams);                     \
    template __global__ void codegen_flat<T, true, true>(const __grid_constant__ KernelParams);                      \
    template __global__ void codegen_flat_skip<T, false>(const __grid_constant__ KernelParams);                      \
    template __global__ void codegen_flat_skip<T, true>(const __grid_constant__ KernelParams);                       \
    template __global__ void codegen_planes<T, 16 / sizeof(T)>(const __grid_constant__ KernelParams);                \
    template __global__ void codegen_planes<T, 1>(const __grid_constant__ KernelParams);                             \
    template __global__ void codegen_planes_skip<T, 16 / sizeof(T)>(const __grid_constant__ KernelParams);           \
    template __global__ void codegen_planes_skip<T, 1>(const __grid_constant__ KernelParams);
FREEU_CODEGEN_TYPE(float)
FREEU_CODEGEN_TYPE(__half)
FREEU_CODEGEN_TYPE(__nv_bfloat16)
#endif

// ------------------------------------------------------------------------------------------------
// Host side: validation, the launch plan, the launch.
// ------------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int32_t pow2_lanes(int64_t want) {  // smallest power of two >= want, clamped to [1, 32]
    int32_t l = 1;
    while (l < 32 && l < want) l <<= 1;
    return l;
}

int64_t align16(int64_t v) { return (v + 15) & ~int64_t(15); }


// Can this role move 16-byte vectors? Every stride that moves between vectors must be a multiple of V
// elements, the contiguous axis must have stride 1, and both base pointers must be 16-byte aligned.
bool vector_ok(const FreeuFusedConcatArgs& a, const FreeuView& src, const FreeuView& dst, int64_t channels, int V,
               bool cl) {
    const int inner = cl ? 1 : 4;  // contiguous axis: C (channels-last) or W
    const int64_t inner_size = cl ? channels : a.w;
    if (src.stride[inner] != 1 || dst.stride[inner] != 1 || inner_size % V != 0) return false;
    for (int d = 0; d < 5; ++d) {
        if (d == inner) continue;
        if (src.stride[d] % V != 0 || dst.stride[d] % V != 0) return false;
    }
    return reinterpret_cast<uintptr_t>(src.data) % 16 == 0 && reinterpret_cast<uintptr_t>(dst.data) % 16 == 0;
}

// Source and destination views of a role, and whether it can move 16-byte vectors.
void init_role(const FreeuFusedConcatArgs& a, RoleParams& r, const FreeuView& src, const FreeuView& dst,
               int64_t channels, int V, bool cl) {
    r.src = src.data;
    r.dst = dst.data;
    for (int d = 0; d < 5; ++d) {
        r.ss[d] = src.stride[d];
        r.ds[d] = dst.stride[d];
    }
    r.channels = channels;
    r.planes = a.n * channels * a.f;
    r.vec = vector_ok(a, src, dst, channels, V, cl) ? 1 : 0;
}

// Elementwise role plan: tasks of about 2 waves over the GPU, 256 * V to 1024 * V elements each.
void plan_elementwise(const FreeuFusedConcatArgs& a, KernelParams& kp, RoleParams& r, int V_full, int num_sms,
                      int64_t& smem_need) {
    const int V = r.vec ? V_full : 1;
    const int64_t area = a.h * a.w;
    const int64_t total = r.planes * area;
    int64_t target = ceil_div(total, 2 * int64_t(num_sms));
    target = std::max<int64_t>(kThreads * V, std::min<int64_t>(target, int64_t(kThreads) * V * kUnroll));
    int64_t G = area >= target ? 1 : std::min<int64_t>(256, std::max<int64_t>(1, target / area));
    if (kp.cl) {
        G = std::min<int64_t>(G, r.channels);
        if (r.vec) G = std::min<int64_t>(256, ceil_div(G, V) * V);  // whole vectors of channels
    } else {
        G = std::min<int64_t>(G, r.planes);
    }
    int64_t rows = std::max<int64_t>(1, std::min<int64_t>(a.h, target / std::max<int64_t>(1, G * a.w)));
    rows = std::min<int64_t>(rows, std::max<int64_t>(1, (kMaxAxis / std::max<int64_t>(1, G * a.w))));
    r.G = static_cast<int32_t>(G);
    r.rows = static_cast<int32_t>(rows);
    r.cgroups = kp.cl ? ceil_div(r.channels, G) : 0;
    r.groups = kp.cl ? a.n * a.f * r.cgroups : ceil_div(r.planes, G);
    r.row_chunks = ceil_div(a.h, rows);
    r.tasks = r.groups * r.row_chunks;
    r.path = kPathPlanes;
    smem_need = std::max<int64_t>(smem_need, G * int64_t(sizeof(PlaneInfo)));
}

// Shared-memory layout of the filter for the chosen path; returns its size in bytes.
int64_t layout_filter(const FreeuFusedConcatArgs& a, KernelParams& kp, int64_t pitch, int elem_size) {
    const int64_t G = kp.sk.G, nyx = int64_t(a.ny) * a.nx;
    int64_t off = align16(G * int64_t(sizeof(PlaneInfo)));
    kp.off_tx = static_cast<int32_t>(off);
    off += kp.use_tab ? 8 * a.w : 0;
    kp.off_ty = static_cast<int32_t>(off);
    off = align16(off + (kp.use_tab ? 8 * a.h : 0));
    kp.off_ri = static_cast<int32_t>(off);
    off = align16(off + 8 * G * nyx);
    kp.off_rs = static_cast<int32_t>(off);
    off = align16(off + 8 * G * int64_t(kp.tile_rows) * a.nx);
    kp.off_plane = static_cast<int32_t>(off);
    if (kp.on_chip) off = align16(off + G * pitch * elem_size);
    return off;
}

// Filter plan: on chip when a group of planes fits in shared memory (one sweep over global memory),
// else two sweeps per plane (the second re-reads the plane, from L2 for planes up to a few hundred KiB).
bool plan_filter(const FreeuFusedConcatArgs& a, KernelParams& kp, int V_full, int elem_size, int num_sms,
                 int64_t& smem_need) {
    RoleParams& r = kp.sk;
    const int64_t H = a.h, W = a.w, area = H * W;
    const int64_t nyx = int64_t(a.ny) * a.nx;
    kp.use_tab = (H + W) <= kTableMaxEntries;
    const int64_t tab_bytes = kp.use_tab ? align16(8 * (H + W)) : 0;
    // On chip, per plane: info, (R, I), a row sum per (row, frequency), the plane itself.
    const int64_t pitch = kp.cl ? (area | 1) : area;  // odd pitch: channel-fastest accesses spread banks
    const int64_t per_plane = int64_t(sizeof(PlaneInfo)) + 8 * nyx + 8 * H * a.nx + pitch * elem_size;
    const int64_t g_fit = area <= kMaxAxis ? (kSmemBudget - tab_bytes - 4 * 16) / per_plane : 0;
    int64_t bytes = kSmemBudget + 1;
    if (g_fit >= 1) {
        // 2048 elements per block keep 256 threads busy; fewer planes when that would leave SMs idle.
        int64_t G = std::min(ceil_div(2048, area), std::max(ceil_div(256, area), ceil_div(r.planes, 2 * int64_t(num_sms))));
        G = std::max<int64_t>(1, std::min(G, g_fit));
        if (kp.cl) {
            G = std::min<int64_t>(G, r.channels);
            if (r.vec) {
                const int64_t Gv = ceil_div(G, V_full) * V_full;
                if (Gv <= g_fit) G = Gv;
                else r.vec = 0;
            }
        }
        kp.on_chip = 1;
        kp.pitch = static_cast<int32_t>(pitch);
        kp.tile_rows = static_cast<int32_t>(H);
        r.G = static_cast<int32_t>(G);
        bytes = layout_filter(a, kp, pitch, elem_size);
    }
    if (bytes > kSmemBudget) {
        // Two sweeps: one plane per block, its rows in tiles whose row sums fit the budget.
        kp.on_chip = 0;
        kp.pitch = 0;
        r.G = 1;
        if (kp.cl) r.vec = 0;  // a lone channels-last plane has no contiguous axis
        int64_t tile = std::min<int64_t>(H, std::max<int64_t>(1, kRowSumCap / a.nx));
        tile = std::min<int64_t>(tile, std::max<int64_t>(1, kMaxAxis / W));
        kp.tile_rows = static_cast<int32_t>(tile);
        bytes = layout_filter(a, kp, 0, elem_size);
        if (bytes > kSmemBudget) return false;
    }
    smem_need = std::max(smem_need, bytes);
    const int64_t G = r.G;
    const int V = r.vec ? V_full : 1;
    kp.lanes_row = pow2_lanes(ceil_div(W, int64_t(kp.on_chip ? 1 : V) * 4));
    kp.lanes_col = pow2_lanes(ceil_div(kp.tile_rows, 4));
    r.rows = static_cast<int32_t>(H);
    r.cgroups = kp.cl ? ceil_div(r.channels, G) : 0;
    r.groups = kp.cl ? a.n * a.f * r.cgroups : ceil_div(r.planes, G);
    r.row_chunks = 1;
    r.tasks = r.groups;
    r.path = kp.on_chip ? kPathOnChip : kPathTwoSweep;
    return true;
}


// Can the role be walked as runs of contiguous elements (the flat path)? Planar: a run is one n, its
// C F H W elements dense (W fastest); channels-last: a run is one pixel's C channels, pixels (n, f, y, x)
// evenly spaced by `outer`. Size-1 dimensions may have any stride.
bool flat_layout(const int64_t (&size)[5], const int64_t (&stride)[5], bool cl, int64_t& outer) {
    static const int kPlanarInner[4] = {4, 3, 2, 1}, kPlanarOuter[1] = {0};
    static const int kClInner[1] = {1}, kClOuter[4] = {4, 3, 2, 0};
    const int* inner = cl ? kClInner : kPlanarInner;
    const int* outer_dims = cl ? kClOuter : kPlanarOuter;
    const int n_inner = cl ? 1 : 4, n_outer = cl ? 4 : 1;
    int64_t expect = 1;
    for (int k = 0; k < n_inner; ++k) {
        const int d = inner[k];
        if (size[d] > 1 && stride[d] != expect) return false;
        expect *= size[d];
    }
    outer = 0;
    for (int k = 0; k < n_outer; ++k) {
        const int d = outer_dims[k];
        if (size[d] <= 1) continue;
        if (outer == 0) {
            outer = stride[d];
            expect = outer;
            if (outer <= 0) return false;
        }
        if (stride[d] != expect) return false;
        expect *= size[d];
    }
    return true;
}

// Flat plan of an elementwise role (role 0 backbone, 1 skip with an empty band); false: not applicable.
bool plan_flat(const FreeuFusedConcatArgs& a, KernelParams& kp, RoleParams& r, const FreeuView& src,
               const FreeuView& dst, int64_t channels, int V, int role) {
    if (!r.vec) return false;
    const bool cl = kp.cl != 0;
    const int64_t size[5] = {a.n, channels, a.f, a.h, a.w};
    int64_t src_outer, dst_outer;
    if (!flat_layout(size, src.stride, cl, src_outer) || !flat_layout(size, dst.stride, cl, dst_outer)) return false;
    const int64_t fhw = a.f * a.h * a.w;
    const int64_t run = cl ? channels : channels * fhw;
    const int64_t total = a.n * channels * fhw;
    // Element indices within a run (and vector indices) stay below 2^31: 32-bit arithmetic, fast division.
    if (run % V != 0 || src_outer % V != 0 || dst_outer % V != 0 || total >= kIndex31) return false;
    const bool v2 = role == 0 && a.version == 2 && a.window_stop > a.window_start;
    if (v2) {  // the map is read as (F H W)-dense slices; planar reads it as float4
        const int64_t* ms = a.map_stride;
        if ((a.w > 1 && ms[3] != 1) || (a.h > 1 && ms[2] != a.w) || (a.f > 1 && ms[1] != a.h * a.w)) return false;
        if (!cl && (reinterpret_cast<uintptr_t>(a.scale_map) % 16 != 0 || ms[0] % 4 != 0)) return false;
    }
    r.path = kPathFlat;
    r.src_outer = src_outer;
    r.dst_outer = dst_outer;
    r.run_vecs = make_fastdiv(static_cast<uint32_t>(run / V));
    r.total_vecs = static_cast<uint32_t>(total / V);
    r.fhw = make_fastdiv(static_cast<uint32_t>(fhw));
    if (role == 0) {
        r.win_lo = static_cast<uint32_t>(cl ? a.window_start : a.window_start * fhw);
        r.win_hi = static_cast<uint32_t>(cl ? a.window_stop : a.window_stop * fhw);
    } else {
        r.win_lo = 0;
        r.win_hi = static_cast<uint32_t>(run);
    }
    // kFlatUnroll vectors per thread: 128 bytes in flight each, and the unrolled code all used. (A small
    // role gets few blocks; it is latency-bound whatever its grid.)
    const int64_t per_task = int64_t(kThreads) * kFlatUnroll;
    r.task_vecs = static_cast<uint32_t>(per_task);
    if (cl) {
        r.tasks = ceil_div(r.total_vecs, per_task);
    } else {  // planar: whole tasks per run (n)
        const int64_t run_tasks = ceil_div(run / V, per_task);
        r.run_tasks = make_fastdiv(static_cast<uint32_t>(run_tasks));
        r.tasks = a.n * run_tasks;
        if (r.tasks >= kIndex31) return false;
    }
    r.G = 0;
    r.rows = 0;
    return true;
}

// The band of the register-tile and channel-vector filters: first residues, the mask bits, 1 / (H W), F.
void plan_band(const FreeuFusedConcatArgs& a, KernelParams& kp) {
    const int64_t kx_res = ((a.kx0 % a.w) + a.w) % a.w, ky_res = ((a.ky0 % a.h) + a.h) % a.h;
    kp.kx_res = static_cast<uint32_t>(kx_res);
    kp.ky_res = static_cast<uint32_t>(ky_res);
    kp.tile_mask = 0;
    for (int i = 0; i < a.ny; ++i)
        for (int j = 0; j < a.nx; ++j) {
            const int64_t ky = int64_t(a.ky0) + i, kx = int64_t(a.kx0) + j;
            if (!a.radial || ky * ky + kx * kx < a.radius_sq) kp.tile_mask |= 1u << (i * a.nx + j);
        }
    kp.inv_area = 1.0 / (static_cast<double>(a.h) * static_cast<double>(a.w));
    kp.div_f = make_fastdiv(static_cast<uint32_t>(a.f));
}

// Register-tile filter plan (contiguous rows of 16-byte vectors, nx = ny <= kTileMaxFreq); false: not applicable.
bool plan_tile(const FreeuFusedConcatArgs& a, KernelParams& kp, int V, int elem_size, int64_t& smem_need) {
    RoleParams& r = kp.sk;
    if (!r.vec || a.nx != a.ny || a.nx < 1 || a.nx > kTileMaxFreq) return false;
    if (a.h % kTileRows != 0 || a.w % V != 0 || r.planes >= kIndex31) return false;
    const int64_t L = a.w / V, row_step = a.h / kTileRows, Tp = L * row_step;
    const auto pow2 = [](int64_t v) { return v > 0 && (v & (v - 1)) == 0; };
    if (!pow2(L) || L > 32 || !pow2(row_step) || Tp > kThreads) return false;
    int64_t bytes = align16(8 * int64_t(a.nx) * (a.w + a.h)) + (kThreads / 32) * int64_t(a.nx) * a.ny * 8;
    const int64_t G = kThreads / Tp;
    if (kp.cl) {  // whole channel vectors per block, staged as planes (pitch H W + V) in shared memory
        if (G % V != 0 || a.n * a.f * ceil_div(r.channels, G) >= kIndex31) return false;
        bytes += align16(G * (a.h * a.w + V) * elem_size);
        int log2 = 0;
        while ((int64_t(1) << log2) < G / V) ++log2;
        kp.tile_log2_cvecs = log2;
        log2 = 0;
        while ((int64_t(1) << log2) < a.w) ++log2;
        kp.tile_log2_w = log2;
    }
    if (bytes > kSmemBudget) return false;
    int log2 = 0;
    while ((int64_t(1) << log2) < L) ++log2;
    kp.tile_lanes = static_cast<int32_t>(L);
    kp.tile_log2_lanes = log2;
    while ((int64_t(1) << log2) < Tp) ++log2;
    kp.tile_threads = static_cast<int32_t>(Tp);
    kp.tile_log2_threads = log2;
    kp.tile_planes = static_cast<int32_t>(kThreads / Tp);
    plan_band(a, kp);
    r.path = kPathTile;
    r.G = kp.tile_planes;
    r.rows = static_cast<int32_t>(a.h);
    r.row_chunks = 1;
    if (kp.cl) {  // a task is (n, f, group of G channels); div_c divides by the groups per (n, f)
        r.cgroups = ceil_div(r.channels, G);
        kp.div_c = make_fastdiv(static_cast<uint32_t>(r.cgroups));
        r.tasks = a.n * a.f * r.cgroups;
    } else {
        kp.div_c = make_fastdiv(static_cast<uint32_t>(r.channels));
        r.tasks = ceil_div(r.planes, r.G);
    }
    smem_need = std::max(smem_need, bytes);
    return true;
}

// Channel-vector filter plan (channels-last, 16-byte channel vectors, nx = ny <= kTileMaxFreq, dense pixel
// rows); false: not applicable. Tried after the register tile, which takes the planes it can stage.
bool plan_clvec(const FreeuFusedConcatArgs& a, KernelParams& kp, int V, int64_t& smem_need) {
    RoleParams& r = kp.sk;
    if (!kp.cl || !r.vec || a.nx != a.ny || a.nx < 1 || a.nx > kTileMaxFreq) return false;
    if (a.h > 1 && (r.ss[3] != a.w * r.ss[4] || r.ds[3] != a.w * r.ds[4])) return false;
    const int64_t P = a.h * a.w;
    if (P >= kIndex31 || P * std::max(r.ss[4], r.ds[4]) >= (int64_t(1) << 62)) return false;
    const int log2cv = r.channels % (2 * V) == 0 ? 1 : 0;  // two vectors per pixel: whole 32-byte sectors
    const int64_t CH = int64_t(V) << log2cv, NF = a.nx;
    const int64_t groups = r.channels / CH, tasks = a.n * a.f * groups;
    if (tasks >= kIndex31) return false;
    const int64_t bytes = align16(8 * NF * (a.w + a.h)) + 8 * a.h * NF * CH + 8 * NF * NF * CH;
    if (bytes > kSmemBudget) return false;
    // Lanes per row: about 8 pixels per lane, all of a row's lanes in one warp.
    int64_t lpr = pow2_lanes(ceil_div(a.w, 8));
    lpr = std::min<int64_t>(lpr, 32 >> log2cv);
    int log2 = 0;
    while ((int64_t(1) << log2) < lpr) ++log2;
    kp.lanes_row = static_cast<int32_t>(lpr);
    kp.clv_log2_lpr = log2;
    // Lanes per moment: as many as keep every (i, j, channel) item in one pass of the block (<= 32).
    int64_t lc = 1;
    while (lc < 32 && NF * NF * CH * lc * 2 <= kThreads) lc <<= 1;
    log2 = 0;
    while ((int64_t(1) << log2) < lc) ++log2;
    kp.lanes_col = static_cast<int32_t>(lc);
    kp.clv_log2_lc = log2;
    kp.clv_log2_vecs = log2cv;
    kp.clv_groups = make_fastdiv(static_cast<uint32_t>(groups));
    plan_band(a, kp);
    r.path = kPathClVectors;
    r.G = static_cast<int32_t>(CH);
    r.rows = static_cast<int32_t>(a.h);
    r.row_chunks = 1;
    r.tasks = tasks;
    smem_need = std::max(smem_need, bytes);
    return true;
}

std::atomic<int> g_sm_cache[64];

int query_num_sms(int& out) {
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    if (dev >= 0 && dev < 64 && g_sm_cache[dev].load() > 0) {
        out = g_sm_cache[dev].load();
        return 0;
    }
    int n = 0;
    e = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
    if (dev >= 0 && dev < 64) g_sm_cache[dev].store(n);
    out = n;
    return 0;
}

template <typename T>
int launch(const KernelParams& kp, int64_t blocks, cudaStream_t stream) {
#ifdef FREEU_EMULATE
    (void)stream;
    emu_launch(static_cast<unsigned int>(blocks), kThreads, kp.smem_bytes, [&] { freeu_fused_concat_kernel<T>(kp); });
#else
    freeu_fused_concat_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, kp.smem_bytes, stream>>>(kp);
#endif
    return static_cast<int>(cudaGetLastError());
}

bool fits_int64_span(const FreeuView& v, const int64_t (&size)[5]) {
    // Largest element offset of the view must fit comfortably in int64 (the kernel adds a few of them).
    __int128 span = 0;
    for (int d = 0; d < 5; ++d) {
        if (v.stride[d] < 0) return false;
        span += static_cast<__int128>(size[d] > 0 ? size[d] - 1 : 0) * v.stride[d];
    }
    return span < (static_cast<__int128>(1) << 62);
}

}  // namespace

extern "C" int freeu_abi_version(void) { return FREEU_ABI_VERSION; }

extern "C" int64_t freeu_args_size(void) { return static_cast<int64_t>(sizeof(FreeuFusedConcatArgs)); }

namespace {

// Validates the arguments and computes the launch: kp and the block count (0: nothing to launch).
// Returns 0 or an error code. Shared by the launcher and freeu_plan, so the analysis sees this very plan.
int make_plan(const FreeuFusedConcatArgs* args, KernelParams& kp, int64_t& blocks) {
    blocks = 0;
    if (args == nullptr) return FREEU_ERR_POINTER;
    const FreeuFusedConcatArgs& a = *args;
    if (a.abi_version != FREEU_ABI_VERSION) return FREEU_ERR_ABI_VERSION;
    int elem_size;
    switch (a.dtype) {
        case FREEU_DTYPE_FLOAT32: elem_size = 4; break;
        case FREEU_DTYPE_FLOAT16:
        case FREEU_DTYPE_BFLOAT16: elem_size = 2; break;
        default: return FREEU_ERR_DTYPE;
    }
    if (a.n < 0 || a.cx < 0 || a.ch < 0 || a.f < 1 || a.h < 0 || a.w < 0) return FREEU_ERR_SHAPE;
    if (a.n == 0 || a.h == 0 || a.w == 0 || a.cx + a.ch == 0) return 0;  // empty output: nothing to write
    if (a.h > kMaxAxis || a.w > kMaxAxis) return FREEU_ERR_TOO_LARGE;
    if (a.window_start < 0 || a.window_start > a.window_stop || a.window_stop > a.cx) return FREEU_ERR_SHAPE;
    if (a.version != 1 && a.version != 2) return FREEU_ERR_SHAPE;
    const bool filter = a.ch > 0 && a.ny > 0 && a.nx > 0;
    if (a.ny < 0 || a.nx < 0 || a.ny > kMaxAxisFreq || a.nx > kMaxAxisFreq) return FREEU_ERR_BAND;
    const int64_t xs[5] = {a.n, a.cx, a.f, a.h, a.w}, hs[5] = {a.n, a.ch, a.f, a.h, a.w};
    if (a.cx > 0 && (a.x.data == nullptr || a.out_x.data == nullptr)) return FREEU_ERR_POINTER;
    if (a.ch > 0 && (a.skip.data == nullptr || a.out_skip.data == nullptr)) return FREEU_ERR_POINTER;
    if (!fits_int64_span(a.x, xs) || !fits_int64_span(a.out_x, xs) || !fits_int64_span(a.skip, hs) ||
        !fits_int64_span(a.out_skip, hs))
        return FREEU_ERR_TOO_LARGE;
    const bool scales_window = a.cx > 0 && a.window_stop > a.window_start;
    if (a.version == 2 && scales_window) {
        if (a.scale_map == nullptr) return FREEU_ERR_POINTER;
        for (int d = 0; d < 4; ++d)
            if (a.map_stride[d] < 0) return FREEU_ERR_SHAPE;
    }

    int num_sms = a.num_sms;
    if (num_sms <= 0) {
        const int e = query_num_sms(num_sms);
        if (e != 0) return e;
    }
    num_sms = std::max(1, num_sms);

    kp = KernelParams{};
    kp.N = a.n;
    kp.F = a.f;
    kp.H = a.h;
    kp.W = a.w;
    kp.cl = a.channels_last ? 1 : 0;
    kp.map = a.scale_map;
    for (int d = 0; d < 4; ++d) kp.ms[d] = a.map_stride[d];
    kp.win0 = a.window_start;
    kp.win1 = a.window_stop;
    kp.version = a.version;
    kp.b = Factor{a.b_ptr, a.b_is_f64, static_cast<float>(a.b_value)};
    kp.s = Factor{a.s_ptr, a.s_is_f64, static_cast<float>(a.s_value)};
    kp.high_gain = static_cast<float>(a.high_gain);
    kp.filter = filter ? 1 : 0;
    kp.ky0 = a.ky0;
    kp.ny = a.ny;
    kp.kx0 = a.kx0;
    kp.nx = a.nx;
    kp.radial = a.radial ? 1 : 0;
    kp.radius_sq = a.radius_sq;

    const int V = 16 / elem_size;
    const bool cl = kp.cl != 0;
    int64_t smem = 16;
    if (a.ch > 0) {
        init_role(a, kp.sk, a.skip, a.out_skip, a.ch, V, cl);
        if (filter) {
            if (!plan_tile(a, kp, V, elem_size, smem) && !plan_clvec(a, kp, V, smem) &&
                !plan_filter(a, kp, V, elem_size, num_sms, smem))
                return FREEU_ERR_TOO_LARGE;
        } else if (!plan_flat(a, kp, kp.sk, a.skip, a.out_skip, a.ch, V, 1)) {
            plan_elementwise(a, kp, kp.sk, V, num_sms, smem);
        }
    }
    if (a.cx > 0) {
        init_role(a, kp.bb, a.x, a.out_x, a.cx, V, cl);
        if (!plan_flat(a, kp, kp.bb, a.x, a.out_x, a.cx, V, 0)) plan_elementwise(a, kp, kp.bb, V, num_sms, smem);
    }
    kp.smem_bytes = static_cast<int32_t>(smem);
    blocks = kp.sk.tasks + kp.bb.tasks;
    if (blocks > 0x7fffffffLL) return FREEU_ERR_TOO_LARGE;
    return 0;
}

}  // namespace

extern "C" int freeu_plan(const FreeuFusedConcatArgs* args, FreeuPlanInfo* plan) {
    if (plan == nullptr) return FREEU_ERR_POINTER;
    KernelParams kp;
    int64_t blocks = 0;
    const int e = make_plan(args, kp, blocks);
    if (e != 0) return e;
    FreeuPlanInfo info = {};
    info.skip_path = kp.sk.tasks > 0 ? kp.sk.path : kPathNone;
    info.backbone_path = kp.bb.tasks > 0 ? kp.bb.path : kPathNone;
    info.skip_blocks = blocks > 0 ? kp.sk.tasks : 0;
    info.backbone_blocks = blocks > 0 ? kp.bb.tasks : 0;
    info.threads = kThreads;
    info.smem_bytes = kp.smem_bytes;
    info.skip_vec = kp.sk.vec;
    info.backbone_vec = kp.bb.vec;
    info.skip_planes_per_block = kp.sk.G;
    info.tile_lanes = kp.tile_lanes;
    info.tile_threads_per_plane = kp.tile_threads;
    info.lanes_row = kp.lanes_row;
    info.lanes_col = kp.lanes_col;
    info.use_tab = kp.use_tab;
    info.tile_rows = kp.tile_rows;
    info.skip_task_vecs = static_cast<int32_t>(kp.sk.task_vecs);
    info.backbone_task_vecs = static_cast<int32_t>(kp.bb.task_vecs);
    info.ny = kp.ny;
    info.nx = kp.nx;
    info.version = kp.version;
    info.channels_last = kp.cl;
    *plan = info;
    return 0;
}

extern "C" int freeu_fused_concat(const FreeuFusedConcatArgs* args, void* stream_handle) {
    KernelParams kp;
    int64_t blocks = 0;
    const int e = make_plan(args, kp, blocks);
    if (e != 0 || blocks <= 0) return e;
    const FreeuFusedConcatArgs& a = *args;
    cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
    switch (a.dtype) {
        case FREEU_DTYPE_FLOAT32: return launch<float>(kp, blocks, stream);
        case FREEU_DTYPE_FLOAT16: return launch<__half>(kp, blocks, stream);
        default: return launch<__nv_bfloat16>(kp, blocks, stream);
    }
}

extern "C" int freeu_prepare(void) {
    cudaFuncAttributes attr;
    cudaError_t e = cudaFuncGetAttributes(&attr, freeu_fused_concat_kernel<float>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, freeu_fused_concat_kernel<__half>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, freeu_fused_concat_kernel<__nv_bfloat16>);
    return static_cast<int>(e);
}

extern "C" int freeu_kernel_info(int32_t dtype, int32_t* num_regs, int32_t* local_bytes, int32_t* max_threads) {
    cudaFuncAttributes attr;
    cudaError_t e;
    switch (dtype) {
        case FREEU_DTYPE_FLOAT32: e = cudaFuncGetAttributes(&attr, freeu_fused_concat_kernel<float>); break;
        case FREEU_DTYPE_FLOAT16: e = cudaFuncGetAttributes(&attr, freeu_fused_concat_kernel<__half>); break;
        case FREEU_DTYPE_BFLOAT16: e = cudaFuncGetAttributes(&attr, freeu_fused_concat_kernel<__nv_bfloat16>); break;
        default: return FREEU_ERR_DTYPE;
    }
    if (e != cudaSuccess) return static_cast<int>(e);
    if (num_regs) *num_regs = attr.numRegs;
    if (local_bytes) *local_bytes = static_cast<int32_t>(attr.localSizeBytes);
    if (max_threads) *max_threads = attr.maxThreadsPerBlock;
    return 0;
}

extern "C" const char* freeu_error_string(int code) {
    switch (code) {
        case 0: return "no error";
        case FREEU_ERR_ABI_VERSION: return "the caller's FreeuFusedConcatArgs layout does not match this library (ABI version)";
        case FREEU_ERR_DTYPE: return "unsupported dtype code (float32, float16, bfloat16 only)";
        case FREEU_ERR_SHAPE: return "invalid sizes, channel window, version or strides";
        case FREEU_ERR_BAND: return "frequency grid larger than 16 per axis";
        case FREEU_ERR_POINTER: return "a required data pointer is NULL";
        case FREEU_ERR_TOO_LARGE: return "sizes or strides exceed what the kernel addresses (2^30 per plane axis, 2^62 offsets)";
        default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error code";
    }
}
