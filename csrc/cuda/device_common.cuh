// Small device helpers shared by csrc/cuda/*: the raw type of one 2/4/8/16-byte access, the
// unpacking of a 16-byte pack of bf16 / fp16 values to fp32, and arithmetic rounded per operation.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace epic::cuda {

template <int BYTES>
struct RawOf;
template <>
struct RawOf<16> {
  using type = uint4;
};
template <>
struct RawOf<8> {
  using type = uint2;
};
template <>
struct RawOf<4> {
  using type = unsigned int;
};
template <>
struct RawOf<2> {
  using type = unsigned short;
};

// The 8 values of a 16-byte pack of T (bf16 or fp16) as fp32, exactly. Little endian: the lower
// half-word of each 32-bit word is the earlier value. The pack is taken by value so that a pack
// read from memory is one 16-byte load (a reference would let the compiler split it).
template <typename T>
__device__ __forceinline__ void unpack8(uint4 r, float (&o)[8]);

template <>
__device__ __forceinline__ void unpack8<c10::BFloat16>(uint4 r, float (&o)[8]) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = __uint_as_float(w[i] << 16);
    o[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

template <>
__device__ __forceinline__ void unpack8<c10::Half>(uint4 r, float (&o)[8]) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], sizeof(h));
    const float2 f = __half22float2(h);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}

// Every operation rounded on its own (never contracted into an FMA), as in the CPU kernels: the
// same inputs give bitwise the same result on both sides of a difference (identical or one-hot KL
// rows must give exactly 0).
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

}  // namespace epic::cuda
