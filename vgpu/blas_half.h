// blas_half.h: exact bf16/f16 <-> f32 conversions for the virtual GPU's cuBLAS face (and its
// self-test). Widening is exact; narrowing rounds to nearest, ties to even, as the hardware's
// cvt.rn does; NaN stays NaN (quieted), overflow goes to infinity.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace vgpu {
namespace half {

inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) { return from_bits(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t x = bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x0040u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t s = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    if (m == 0) return from_bits(s);
    return from_bits(bits(float(m) * 0x1p-24f) | s);  // subnormal: m * 2^-24, exact in f32
  }
  if (e == 31) return from_bits(s | 0x7f800000u | (m << 13));  // inf / NaN
  return from_bits(s | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t f32_to_f16(float f) {
  uint32_t x = bits(f);
  uint16_t s = uint16_t((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint16_t(s | 0x7e00u | ((ax >> 13) & 0x3ffu));  // quiet NaN
  if (ax >= 0x477ff000u) return uint16_t(s | 0x7c00u);  // >= 65520 (halfway past 65504): inf
  if (ax < 0x38800000u) {  // below 2^-14: subnormal or zero, in units of 2^-24
    float a = from_bits(ax) * 0x1p24f;  // exact (power of two, no overflow)
    long r = std::lrintf(a);            // current rounding mode: nearest even
    return uint16_t(s | uint16_t(r));    // r == 1024 is the smallest normal, encoded right
  }
  uint32_t e = (ax >> 23) - 112u, m = ax & 0x7fffffu;
  uint32_t h = (e << 10) | (m >> 13), rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;  // carries into the exponent as it must
  return uint16_t(s | h);
}

}  // namespace half
}  // namespace vgpu
