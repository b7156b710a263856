// splitmix64 (Steele, Lea & Flood 2014): a fixed, well-mixed 64-bit hash of a counter — every
// deterministic draw in kvtp (synthetic weights, random eviction, sampling, passkey keys) goes
// through it, so a seed means the same numbers on every rank and every machine.
#pragma once
#include <cstdint>

#include "kernels/host_device.h"

namespace kvtp::kernels {

KVTP_HOST_DEVICE inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The top 53 bits of a hash as a uniform number in [0, 1).
KVTP_HOST_DEVICE inline double unitInterval(uint64_t h) { return double(h >> 11) * 0x1.0p-53; }

// The Random eviction method's score of a cache entry: uniform in [0, 1), splitmix64 of the seed,
// the layer, the global KV head and the position, so it is fixed per entry and the same on every
// rank, CPU or device.
KVTP_HOST_DEVICE inline double entryDraw(uint64_t seed, int layer, int global_head, int position) {
  const uint64_t coordinates = (uint64_t(layer) << 40) ^ (uint64_t(global_head) << 32) ^ uint32_t(position);
  return unitInterval(splitmix64(seed + 0x9e3779b97f4a7c15ull * coordinates));
}

}  // namespace kvtp::kernels
