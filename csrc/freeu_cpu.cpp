// freeu_kernels CPU backend: FreeU at one skip concat in one pass over the data, on host threads.
//
// The same C ABI as the CUDA kernel (freeu_fused_concat.h), so freeu_kernels/backends/c_abi.py drives
// both; here every pointer is a host pointer, `stream` is ignored and `num_sms` is the number of host
// threads (<= 0: std::thread::hardware_concurrency()), taken from torch's OpenMP team when the process
// has one (host_openmp), else started per call.
//
// Work items are (n, c, f) planes of the output, handed to the threads through an atomic counter:
//   backbone plane:  out = x * scale, scale = b in the window (v1), the float32 map (v2), else a copy;
//   skip plane:      the column moments, the masked coefficients and the update in two sweeps of the
//                    plane, the second from cache (freeu_cpu_kernels.h has the math, docs/design.md section 2).
// Each input element is read once and each output element written once; the arithmetic is 4 ny
// multiply-adds per element in float32, in loops the compiler vectorises (-fopenmp-simd: no OpenMP
// runtime is linked, so nothing clashes with torch's). The kernels are compiled for x86-64-v4 (AVX-512,
// 16-lane vectors), x86-64-v3 (AVX2, 8 lanes) and the baseline (SSE2 on x86-64, the only copy on other
// processors; 4 lanes), and picked at run time. Low-precision stores round to nearest even.
#include "freeu_fused_concat.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxFrequencies = 16;  // per axis, as in the CUDA kernel
constexpr int kMaxThreads = 256;

// ---- element types ---------------------------------------------------------------------------------
struct Bf16 {
    uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(Bf16 v) {
    const uint32_t u = uint32_t(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float to_float(_Float16 v) { return static_cast<float>(v); }

template <class T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline _Float16 from_float<_Float16>(float f) { return static_cast<_Float16>(f); }
template <> inline Bf16 from_float<Bf16>(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return Bf16{static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};  // a select: vectorises
}

// ---- one call's constants ----------------------------------------------------------------------------
struct Plan {
    const FreeuFusedConcatArgs* a;
    float b, s_gain, high_gain;  // s_gain = (s - g_hi) / (H W)
    int ny, nx;
    std::vector<float> cos_x, sin_x;  // [nx][W rounded up to 16, zero-padded]
    // The same rows with each whole block of 2 L columns stored as its L even columns, then its L odd
    // ones (L = the copy's lanes per vector): the lane order of bfloat16 data read as 32-bit words
    // (freeu_cpu_kernels.h, load_pair).
    std::vector<float> cos_x_pairs, sin_x_pairs;
    std::vector<float> cos_y, sin_y;  // [ny][H]
    std::vector<float> weight;        // [ny][nx]: 1 where the grid point is masked
    std::vector<bool> sin_x_nonzero, sin_y_nonzero;  // per frequency: false for an all-zero sine row
    int64_t backbone_items, skip_items;
    bool channels_major;  // channels_last layout, bands of 1 or 2 per axis: the kernels run across channels
};

// cos and sin of 2 pi k n / size for n < size, one row of `pitch` (>= size, zero-padded) per frequency;
// k n is reduced modulo size in integers first, so the angle is exact for any size (as the torch
// backend's twiddle tables).
void twiddles(int64_t size, int64_t pitch, int64_t k0, int count, std::vector<float>& c, std::vector<float>& s) {
    c.assign(size_t(count) * pitch, 0.f);
    s.assign(size_t(count) * pitch, 0.f);
    for (int j = 0; j < count; ++j) {
        const int64_t k = ((k0 + j) % size + size) % size;
        for (int64_t n = 0; n < size; ++n) {
            const int64_t turn = (k * n) % size;  // angle = 2 pi turn / size
            const double angle = 2.0 * M_PI * double(turn) / double(size);
            c[size_t(j) * pitch + n] = float(std::cos(angle));
            // a multiple of pi: the sine is exactly 0 (std::sin(pi) is 1.2e-16), so all-zero sine rows
            // (frequency 0, the Nyquist frequency) are recognised and skipped by the kernels
            s[size_t(j) * pitch + n] = (2 * turn) % size == 0 ? 0.f : float(std::sin(angle));
        }
    }
}

}  // namespace

// The kernels, compiled once per instruction set; chosen_copy() picks one per call. Each copy lives in
// its own namespace; the helpers above are inlined into it and take its ISA. (GCC only: clang does not
// take "#pragma GCC target", so a clang build carries the baseline copy alone.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FREEU_CPU_MULTI_ISA 1
#else
#define FREEU_CPU_MULTI_ISA 0
#endif
#if FREEU_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define FREEU_CPU_NS isa_x86_64_v4
#define FREEU_CPU_LANES 16
#include "freeu_cpu_kernels.h"
#undef FREEU_CPU_LANES
#undef FREEU_CPU_NS
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define FREEU_CPU_NS isa_x86_64_v3
#define FREEU_CPU_LANES 8
#include "freeu_cpu_kernels.h"
#undef FREEU_CPU_LANES
#undef FREEU_CPU_NS
#pragma GCC pop_options
#endif
#define FREEU_CPU_NS isa_baseline
#define FREEU_CPU_LANES 4
#include "freeu_cpu_kernels.h"
#undef FREEU_CPU_LANES
#undef FREEU_CPU_NS

namespace {

double read_factor(const void* ptr, int32_t is_f64, double value) {
    if (ptr == nullptr) return value;
    return is_f64 ? *static_cast<const double*>(ptr) : double(*static_cast<const float*>(ptr));
}

using RunItems = void (*)(const Plan&, std::atomic<int64_t>&, int64_t);

struct KernelCopy {
    const char* name;
    RunItems run_items;
    int lanes;  // float lanes per vector of the copy (its kLanes): the bfloat16 column tables and channel blocks follow it
    bool supported;
};

// The kernel copies, widest first, with whether this processor runs them (probed once).
const std::vector<KernelCopy>& kernel_copies() {
    static const std::vector<KernelCopy> copies = [] {
        std::vector<KernelCopy> list;
#if FREEU_CPU_MULTI_ISA
        __builtin_cpu_init();
        list.push_back({"x86-64-v4", &isa_x86_64_v4::run_items, isa_x86_64_v4::kLanes, bool(__builtin_cpu_supports("x86-64-v4"))});
        list.push_back({"x86-64-v3", &isa_x86_64_v3::run_items, isa_x86_64_v3::kLanes, bool(__builtin_cpu_supports("x86-64-v3"))});
#endif
        list.push_back({"baseline", &isa_baseline::run_items, isa_baseline::kLanes, true});
        return list;
    }();
    return copies;
}

// Rows narrower than this run the widest copy whose vector divides them (see chosen_copy).
constexpr int64_t kNarrowRow = 16;

// The copy a call runs: $FREEU_KERNELS_CPU_ISA when it names one this processor runs (tests use it to
// cover every copy), else the widest this processor runs; except for planar work on rows narrower than
// kNarrowRow (`planar_row`, 0: none), which takes the widest copy whose vector divides the row, else the
// baseline: a row of 8 on a 16-lane copy leaves half of every vector idle. Measured 2026-12-01 on a
// Sapphire Rapids, time / the torch backend's, 1 thread: 8x8 planes v4 1.7-1.8, v3 0.6-0.8; 12x12 v4
// 1.2-1.9, v3 1.0-1.1, baseline 0.5-0.7 (registry.py has the whole table).
const KernelCopy& chosen_copy(int64_t planar_row = 0) {
    const auto& copies = kernel_copies();
    if (const char* forced = std::getenv("FREEU_KERNELS_CPU_ISA")) {
        for (const auto& copy : copies)
            if (copy.supported && std::strcmp(copy.name, forced) == 0) return copy;
    }
    const bool narrow = planar_row > 0 && planar_row < kNarrowRow;
    for (const auto& copy : copies)
        if (copy.supported && (!narrow || planar_row % copy.lanes == 0)) return copy;
    return copies.back();
}

// channels_last (channels contiguous in all four views) with a band of 1 or 2 frequencies per axis: the
// kernels run across channels, work items are pixel rows (backbone) and blocks of L channels (2 L for
// bfloat16; skip), L the copy's lanes; else (n, c, f) planes.
bool runs_across_channels(const FreeuFusedConcatArgs& a) {
    auto channels_contiguous = [](const FreeuView& v, int64_t channels) { return channels <= 1 || v.stride[1] == 1; };
    return a.channels_last && a.ny >= 1 && a.ny <= 2 && a.nx >= 1 && a.nx <= 2 &&
           channels_contiguous(a.x, a.cx) && channels_contiguous(a.out_x, a.cx) &&
           channels_contiguous(a.skip, a.ch) && channels_contiguous(a.out_skip, a.ch);
}

// The host's OpenMP runtime, when the process has one loaded with global symbols (PyTorch's libgomp:
// GOMP_parallel(fn, data, threads, flags) runs fn on the caller and threads - 1 team threads and returns
// when all are done). Running the work items in torch's own team matters on a busy or small machine:
// after each torch op its OpenMP threads keep spinning for a while, and threads of our own then compete
// with them for the cores (measured 2026-12-01, Sapphire Rapids, 2 vCPUs, 2 threads, bf16
// (2,1280,32,32)x2 right after a torch.cat: 1.74 ms with std::thread workers, 0.88 ms in torch's team, 0.89
// ms with no torch op before it). Without one (no torch, or $FREEU_KERNELS_CPU_POOL=threads, which the
// tests use to cover both), std::thread workers per call.
using HostParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
HostParallel host_openmp() {
    static const HostParallel found = reinterpret_cast<HostParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    const char* pool = std::getenv("FREEU_KERNELS_CPU_POOL");
    return pool != nullptr && std::strcmp(pool, "threads") == 0 ? nullptr : found;
}

template <class Closure> void call_closure(void* closure) { (*static_cast<Closure*>(closure))(); }

int run(const FreeuFusedConcatArgs& a) {
    const bool channels_major = runs_across_channels(a);
    const KernelCopy& copy = chosen_copy(channels_major ? 0 : a.w);
    const RunItems run_items = copy.run_items;
    const int64_t lanes = copy.lanes;
    Plan p;
    p.a = &a;
    p.b = float(read_factor(a.b_ptr, a.b_is_f64, a.b_value));
    const double s = read_factor(a.s_ptr, a.s_is_f64, a.s_value);
    p.high_gain = float(a.high_gain);
    p.s_gain = float((s - a.high_gain) / (double(a.h) * double(a.w)));
    p.ny = a.ny;
    p.nx = a.nx;
    // x rows are padded to whole 16-lane strips (the kernels' vectors), y rows are not.
    twiddles(a.w, (a.w + 15) / 16 * 16, a.kx0, a.nx, p.cos_x, p.sin_x);
    twiddles(a.h, a.h, a.ky0, a.ny, p.cos_y, p.sin_y);
    auto deinterleave = [&](const std::vector<float>& table) {
        const int64_t pitch = (a.w + 15) / 16 * 16, whole = a.w / (2 * lanes) * (2 * lanes);
        std::vector<float> out(table);
        for (int j = 0; j < a.nx; ++j)
            for (int64_t x0 = 0; x0 < whole; x0 += 2 * lanes)
                for (int64_t l = 0; l < lanes; ++l) {
                    out[size_t(j * pitch + x0 + l)] = table[size_t(j * pitch + x0 + 2 * l)];
                    out[size_t(j * pitch + x0 + lanes + l)] = table[size_t(j * pitch + x0 + 2 * l + 1)];
                }
        return out;
    };
    p.cos_x_pairs = deinterleave(p.cos_x);
    p.sin_x_pairs = deinterleave(p.sin_x);
    auto nonzero_rows = [](const std::vector<float>& table, int count, int64_t pitch) {
        std::vector<bool> keep(size_t(count), false);
        for (int j = 0; j < count; ++j)
            for (int64_t n = 0; n < pitch; ++n) keep[size_t(j)] = keep[size_t(j)] || table[size_t(j) * pitch + n] != 0.f;
        return keep;
    };
    p.sin_x_nonzero = nonzero_rows(p.sin_x, a.nx, (a.w + 15) / 16 * 16);
    p.sin_y_nonzero = nonzero_rows(p.sin_y, a.ny, a.h);
    p.weight.assign(size_t(a.ny) * size_t(a.nx), 1.f);
    if (a.radial) {
        for (int i = 0; i < a.ny; ++i)
            for (int j = 0; j < a.nx; ++j) {
                const int64_t ky = a.ky0 + i, kx = a.kx0 + j;
                p.weight[size_t(i) * a.nx + j] = (ky * ky + kx * kx < a.radius_sq) ? 1.f : 0.f;
            }
    }
    p.channels_major = channels_major;
    p.backbone_items = p.channels_major ? (a.cx > 0 ? a.n * a.f * a.h : 0) : a.n * a.cx * a.f;
    const int64_t channel_block = a.dtype == FREEU_DTYPE_BFLOAT16 ? 2 * lanes : lanes;  // freeu_cpu_kernels.h channel_block()
    p.skip_items = p.channels_major ? a.n * a.f * ((a.ch + channel_block - 1) / channel_block) : a.n * a.ch * a.f;
    const int64_t total = p.backbone_items + p.skip_items;
    if (total == 0 || a.h == 0 || a.w == 0) return 0;
    int64_t threads = a.num_sms > 0 ? a.num_sms : int64_t(std::thread::hardware_concurrency());
    threads = std::max<int64_t>(1, std::min<int64_t>({threads, int64_t(kMaxThreads), (total + 7) / 8}));
    std::atomic<int64_t> next{0};
    std::exception_ptr failure;
    std::atomic<bool> failed{false};
    auto worker = [&]() {  // never throws: GOMP_parallel must not see an exception
        try {
            run_items(p, next, total);
        } catch (...) {
            if (!failed.exchange(true)) failure = std::current_exception();
            next.store(total);  // the others stop at their next item block
        }
    };
    const HostParallel parallel = host_openmp();
    if (threads == 1) {
        worker();
    } else if (parallel != nullptr) {
        parallel(&call_closure<decltype(worker)>, &worker, unsigned(threads), 0);
    } else {
        std::vector<std::thread> pool;
        try {
            for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker);
        } catch (...) {
            // Fewer threads than asked (the system refused one): the ones running and this one finish the work.
        }
        worker();
        for (auto& t : pool) t.join();
    }
    if (failed.load()) {
        try {
            std::rethrow_exception(failure);
        } catch (const std::bad_alloc&) {
            return FREEU_ERR_TOO_LARGE;
        } catch (...) {
            return FREEU_ERR_SHAPE;
        }
    }
    return 0;
}

int check(const FreeuFusedConcatArgs* a) {
    if (a == nullptr || a->abi_version != FREEU_ABI_VERSION) return FREEU_ERR_ABI_VERSION;
    if (a->dtype != FREEU_DTYPE_FLOAT32 && a->dtype != FREEU_DTYPE_FLOAT16 && a->dtype != FREEU_DTYPE_BFLOAT16)
        return FREEU_ERR_DTYPE;
    if (a->n < 0 || a->cx < 0 || a->ch < 0 || a->f < 0 || a->h < 0 || a->w < 0) return FREEU_ERR_SHAPE;
    if (a->ny < 0 || a->nx < 0 || a->ny > kMaxFrequencies || a->nx > kMaxFrequencies) return FREEU_ERR_BAND;
    if (a->window_start < 0 || a->window_stop > a->cx || a->window_start > a->window_stop) return FREEU_ERR_SHAPE;
    const bool any_x = a->n * a->cx * a->f * a->h * a->w > 0, any_skip = a->n * a->ch * a->f * a->h * a->w > 0;
    if (any_x && (a->x.data == nullptr || a->out_x.data == nullptr)) return FREEU_ERR_POINTER;
    if (any_skip && (a->skip.data == nullptr || a->out_skip.data == nullptr)) return FREEU_ERR_POINTER;
    if (any_x && a->version == 2 && a->window_stop > a->window_start && a->scale_map == nullptr)
        return FREEU_ERR_POINTER;
    return 0;
}

}  // namespace

extern "C" {

FREEU_API int freeu_abi_version(void) { return FREEU_ABI_VERSION; }

FREEU_API int64_t freeu_args_size(void) { return int64_t(sizeof(FreeuFusedConcatArgs)); }

FREEU_API int freeu_fused_concat(const FreeuFusedConcatArgs* args, void* /*stream: host library*/) {
    const int code = check(args);
    if (code != 0) return code;
    try {
        return run(*args);
    } catch (const std::bad_alloc&) {
        return FREEU_ERR_TOO_LARGE;
    } catch (...) {
        return FREEU_ERR_SHAPE;
    }
}

FREEU_API int freeu_prepare(void) { return 0; }

// CPU library only: the name of the kernel copy calls run ("x86-64-v4", "x86-64-v3" or "baseline"); contiguous
// planes narrower than 16 columns may run a narrower one (chosen_copy).
FREEU_API const char* freeu_cpu_isa(void) { return chosen_copy().name; }

FREEU_API int freeu_kernel_info(int32_t /*dtype*/, int32_t* num_regs, int32_t* local_bytes, int32_t* max_threads) {
    if (num_regs) *num_regs = 0;
    if (local_bytes) *local_bytes = 0;
    if (max_threads) *max_threads = kMaxThreads;
    return 0;
}

FREEU_API const char* freeu_error_string(int code) {
    switch (code) {
        case 0: return "no error";
        case FREEU_ERR_ABI_VERSION: return "argument struct of another ABI version";
        case FREEU_ERR_DTYPE: return "unsupported dtype";
        case FREEU_ERR_SHAPE: return "invalid shape, window or internal failure";
        case FREEU_ERR_BAND: return "frequency band larger than 16 per axis";
        case FREEU_ERR_POINTER: return "null data pointer for a non-empty tensor";
        case FREEU_ERR_TOO_LARGE: return "out of host memory for the plane buffers";
        default: return "unknown error code";
    }
}

}  // extern "C"
