/*
 * freeu_kernels CUDA backend: the C ABI of libfreeu_kernels_cuda.so.
 *
 * Plain C types only, so the library is independent of the torch and Python versions: Python fills a
 * FreeuFusedConcatArgs through ctypes (freeu_kernels/backends/cuda_backend.py mirrors this struct field
 * for field; bump FREEU_ABI_VERSION whenever the layout changes) and passes the current CUDA stream.
 *
 * A "view" describes one tensor as the logical 5-D array (N, C, F, H, W) with int64 element strides
 * (4-D tensors have F = 1). out_x and out_skip are the two channel slices of the one output tensor:
 * out_skip.data already points at channel Cx, which is how the concat happens.
 */
#ifndef FREEU_FUSED_CONCAT_H
#define FREEU_FUSED_CONCAT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FREEU_ABI_VERSION 1

/* The library is built with -fvisibility=hidden: only these entry points are exported. */
#if defined(__GNUC__)
#define FREEU_API __attribute__((visibility("default")))
#else
#define FREEU_API
#endif

/* dtype codes */
#define FREEU_DTYPE_FLOAT32 0
#define FREEU_DTYPE_FLOAT16 1
#define FREEU_DTYPE_BFLOAT16 2

/* Argument errors found by the launcher (negative so they never collide with cudaError_t codes). */
#define FREEU_ERR_ABI_VERSION (-1)
#define FREEU_ERR_DTYPE (-2)
#define FREEU_ERR_SHAPE (-3)
#define FREEU_ERR_BAND (-4)
#define FREEU_ERR_POINTER (-5)
#define FREEU_ERR_TOO_LARGE (-6)

typedef struct FreeuView {
    void* data;         /* element (0, 0, 0, 0, 0) of the view */
    int64_t stride[5];  /* element strides of N, C, F, H, W (0 for a dimension of size 1 is fine) */
} FreeuView;

typedef struct FreeuFusedConcatArgs {
    int32_t abi_version;  /* FREEU_ABI_VERSION */
    int32_t dtype;        /* FREEU_DTYPE_* of x, skip and the output */
    int64_t n, cx, ch, f, h, w;
    FreeuView x;          /* backbone input (N, Cx, F, H, W) */
    FreeuView skip;       /* skip input (N, Ch, F, H, W) */
    FreeuView out_x;      /* output channels [0, Cx) */
    FreeuView out_skip;   /* output channels [Cx, Cx + Ch) */
    const float* scale_map;  /* version 2: float32 (N, F, H, W) scale of the window, else NULL */
    int64_t map_stride[4];   /* element strides of scale_map: N, F, H, W */
    int64_t window_start, window_stop; /* backbone channels scaled: [start, stop) */
    const void* b_ptr;    /* device 0-d float32/float64 tensor holding b, or NULL: then b_value is used */
    const void* s_ptr;    /* likewise for s */
    double b_value, s_value;
    double high_gain;     /* g_hi: gain of the frequencies outside the mask */
    int32_t b_is_f64, s_is_f64; /* dtype of *b_ptr / *s_ptr: 1 float64, 0 float32 */
    int32_t version;      /* 1: window scaled by b; 2: window scaled by scale_map */
    int32_t ky0, ny, kx0, nx; /* frequency grid [ky0, ky0 + ny) x [kx0, kx0 + nx), ny, nx <= 16 */
    int32_t radial;       /* 0: box (every grid point masked); 1: ky^2 + kx^2 < radius_sq */
    int64_t radius_sq;
    int32_t channels_last; /* 1: channels innermost in memory (walk channels fastest) */
    int32_t num_sms;      /* multiprocessor count of the device, or <= 0 to query it */
} FreeuFusedConcatArgs;

/* Launch paths of one role (FreeuPlanInfo), see csrc/README.md. */
#define FREEU_PATH_NONE 0      /* the role has no elements */
#define FREEU_PATH_FLAT 1      /* scaled copy of contiguous runs (16-byte vectors) */
#define FREEU_PATH_PLANES 2    /* elementwise over groups of planes, any strides */
#define FREEU_PATH_TILE 3      /* skip filter, each plane held in registers (contiguous rows, small bands) */
#define FREEU_PATH_ON_CHIP 4   /* skip filter, groups of planes staged in shared memory */
#define FREEU_PATH_TWO_SWEEP 5 /* skip filter, one plane per block, two sweeps over global memory */
#define FREEU_PATH_CL_VECTORS 6 /* skip filter, channels-last: channel vectors x pixels, two sweeps */

/* The launch plan freeu_fused_concat computes for some arguments (host only: nothing is launched). It is
 * what a GPU-less analysis (bench/codegen) needs to count the compiled code exactly as it would run. */
typedef struct FreeuPlanInfo {
    int32_t skip_path, backbone_path;     /* FREEU_PATH_* */
    int64_t skip_blocks, backbone_blocks; /* blocks [0, skip_blocks) are skip tasks, the rest backbone */
    int32_t threads, smem_bytes;          /* per block */
    int32_t skip_vec, backbone_vec;       /* 1: 16-byte vectors */
    int32_t skip_planes_per_block;        /* G (plane paths) */
    int32_t tile_lanes, tile_threads_per_plane; /* register-tile filter: lanes per row, threads per plane */
    int32_t lanes_row, lanes_col, use_tab, tile_rows; /* shared-memory filter paths */
    int32_t skip_task_vecs, backbone_task_vecs;       /* flat paths: vectors per block */
    int32_t ny, nx, version, channels_last;
} FreeuPlanInfo;

/* Fills *plan with the launch freeu_fused_concat(args) would make; 0 or the same error code. */
FREEU_API int freeu_plan(const FreeuFusedConcatArgs* args, FreeuPlanInfo* plan);

/* FREEU_ABI_VERSION of the compiled library, and sizeof(FreeuFusedConcatArgs) (a caller checks both). */
FREEU_API int freeu_abi_version(void);
FREEU_API int64_t freeu_args_size(void);

/* One launch on `stream` (a cudaStream_t) writing the whole output. No allocation, no synchronisation:
 * safe under CUDA graph capture. Returns 0, a cudaError_t code (> 0) or a FREEU_ERR_* code (< 0). */
FREEU_API int freeu_fused_concat(const FreeuFusedConcatArgs* args, void* stream);

/* Loads the kernels into the current device's context (CUDA loads modules lazily, on first launch);
 * call it once per device outside graph capture. Returns 0 or a cudaError_t code. */
FREEU_API int freeu_prepare(void);

/* Registers per thread and local-memory bytes of the kernel for dtype (diagnostics); 0 or an error. */
FREEU_API int freeu_kernel_info(int32_t dtype, int32_t* num_regs, int32_t* local_bytes, int32_t* max_threads);

/* Human-readable text for any code returned above. */
FREEU_API const char* freeu_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* FREEU_FUSED_CONCAT_H */
