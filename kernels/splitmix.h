// splitmix64 (Steele, Lea & Flood 2014): a fixed, well-mixed 64-bit hash of a counter — every
// deterministic draw in kvtp (synthetic weights, random eviction, sampling, passkey keys) goes
// through it, so a seed means the same numbers on every rank and every machine.
#pragma once
#include <cstdint>

namespace kvtp::kernels {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The top 53 bits of a hash as a uniform number in [0, 1).
inline double unitInterval(uint64_t h) { return double(h >> 11) * 0x1.0p-53; }

}  // namespace kvtp::kernels
