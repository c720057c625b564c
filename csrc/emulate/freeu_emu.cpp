// The CUDA kernel of freeu_fused_concat.cu compiled for the CPU through cuda_emu.h: same C ABI
// (freeu_fused_concat.h), host pointers instead of device pointers. Built and used by
// tests/test_cuda_backend.py; not part of the installed package.
#define FREEU_EMULATE 1
#include "../freeu_fused_concat.cu"
