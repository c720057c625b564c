// A CPU stand-in for the few CUDA features freeu_fused_concat.cu uses, so the SAME kernel source runs on
// a machine without a GPU (CI, this repository's tests): every CUDA thread of a block is a host thread,
// __syncthreads is a std::barrier over the block, a warp shuffle is a store / barrier / load / barrier
// over the 32 threads of the warp. Blocks run one after another; shared memory is filled with a NaN
// pattern before each block, so a read of something no thread wrote shows up in the results.
//
// It checks the kernel's logic: indexing, the phases and their barriers, the reductions, the launch plan.
// It says nothing about speed, and it cannot see races that only the real memory model exposes
// (compute-sanitizer's racecheck does that on a GPU: tools/gpu_verify.sh).
#ifndef FREEU_CUDA_EMU_H
#define FREEU_CUDA_EMU_H

#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
#define __shared__
#define __restrict__

struct EmuDim3 {
    unsigned int x, y, z;
};
inline thread_local EmuDim3 threadIdx{0, 0, 0};
inline thread_local EmuDim3 blockIdx{0, 0, 0};

// ---- numeric types and intrinsics -----------------------------------------------------------------
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

inline float emu_bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t emu_float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __half2float(__half h) { return static_cast<float>(std::bit_cast<_Float16>(h.bits)); }
inline __half __float2half_rn(float f) { return __half{std::bit_cast<uint16_t>(static_cast<_Float16>(f))}; }
inline float __bfloat162float(__nv_bfloat16 b) { return emu_bits_to_float(uint32_t(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = emu_float_to_bits(f);
    if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) float4 {
    float x, y, z, w;
};

inline void sincospif(float x, float* s, float* c) {
    const double a = 3.14159265358979323846 * static_cast<double>(x);
    *s = static_cast<float>(std::sin(a));
    *c = static_cast<float>(std::cos(a));
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return static_cast<unsigned int>((static_cast<uint64_t>(a) * b) >> 32);
}
using std::fmaf;

template <class A, class B> inline auto min(A a, B b) { return a < b ? a : b; }
template <class A, class B> inline auto max(A a, B b) { return a < b ? b : a; }

// ---- runtime --------------------------------------------------------------------------------------
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
enum { cudaDevAttrMultiProcessorCount = 16 };
struct cudaFuncAttributes {
    int numRegs;
    size_t localSizeBytes;
    int maxThreadsPerBlock;
};
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
    *d = 0;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, int, int) {
    *v = 4;  // a small "GPU": makes the plan choose several planes per block
    return cudaSuccess;
}
template <class F> inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) {
    *a = cudaFuncAttributes{0, 0, 256};
    return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

// ---- the block emulator ---------------------------------------------------------------------------
struct EmuBlockState {
    std::barrier<>* block_barrier;
    std::vector<std::barrier<>*> warp_barriers;
    float shuffle_slots[32][32];
    unsigned char* smem;
};
inline thread_local EmuBlockState* emu_state = nullptr;

inline void __syncthreads() { emu_state->block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned int, float v, int lane_mask) {
    const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
    emu_state->shuffle_slots[warp][lane] = v;
    emu_state->warp_barriers[warp]->arrive_and_wait();
    const float r = emu_state->shuffle_slots[warp][lane ^ static_cast<unsigned>(lane_mask)];
    emu_state->warp_barriers[warp]->arrive_and_wait();
    return r;
}

inline unsigned char* emu_shared_memory() { return emu_state->smem; }

// Runs `body` for every thread of `blocks` blocks of `threads` threads (threads a multiple of 32).
inline void emu_launch(unsigned int blocks, unsigned int threads, size_t smem_bytes, const std::function<void()>& body) {
    std::barrier<> block_barrier(threads);
    std::vector<std::barrier<>*> warps;
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(new std::barrier<>(32));
    std::vector<unsigned char> smem(smem_bytes + 16);
    EmuBlockState state{&block_barrier, warps, {}, smem.data()};
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            emu_state = &state;
            threadIdx = EmuDim3{t, 0, 0};
            for (unsigned b = 0; b < blocks; ++b) {
                if (t == 0) std::memset(smem.data(), 0xff, smem.size());  // NaN everywhere: catches unwritten reads
                block_barrier.arrive_and_wait();
                blockIdx = EmuDim3{b, 0, 0};
                body();
                block_barrier.arrive_and_wait();
            }
        });
    }
    for (auto& th : pool) th.join();
    for (auto* w : warps) delete w;
}

#endif  // FREEU_CUDA_EMU_H
