// The radix select behind the KV budget's decision (kv/budget_select.h), one pool's state, shared
// by the CPU (kv/budget_select.cpp) and the device (kernels/cuda/eviction.cu) so both pick the same
// byte from the same histogram: the r-th highest of a pool's keys is found a byte at a time from
// the top, each pass counting the next byte of the keys that match the bytes found so far.
#pragma once
#include <cstdint>
#include <cstring>

#include "kernels/host_device.h"

namespace kvtp::kernels {

// A key as an unsigned integer of the same order (doubles: the sign bit flipped for positives,
// every bit for negatives), so a radix pass can bucket it by its bytes. +inf's top byte is 0xff,
// -inf's 0x00; the finite keys of eviction (scores, positions, counts: all >= 0) lie between.
KVTP_HOST_DEVICE inline uint64_t orderedKey(double key) {
  uint64_t u;
  memcpy(&u, &key, sizeof u);
  return u >> 63 ? ~u : u | (uint64_t(1) << 63);
}

struct RadixSelect {
  uint64_t prefix = 0, mask = 0;  // the bytes of the r-th highest key found so far
  int64_t r = 0;                  // its rank among the keys under the prefix; after the last
                                  // pass, how many of the keys equal to the threshold are kept
  int done = 0;                   // r fell to 0: only keys above the threshold are kept (none)

  KVTP_HOST_DEVICE static RadixSelect start(int64_t budget) { return {0, 0, budget, 0}; }
  // Every key above it is kept, and the first r (in table order) of those equal to it.
  KVTP_HOST_DEVICE uint64_t threshold() const { return done ? ~uint64_t(0) : prefix; }
  KVTP_HOST_DEVICE bool under(uint64_t key) const { return (key & mask) == prefix; }
  // Fixes the byte at `shift` from the pass's histogram (256 counts of that byte among the keys
  // under the prefix, every rank's summed). The first pass (shift 56) holds r between the
  // protected keys (+inf, always kept) and the keys that are not holes (-inf, never kept).
  KVTP_HOST_DEVICE void pick(const double* hist, int shift) {
    if (done) return;
    if (shift == 56) {
      double total = 0;
      for (int b = 0; b < 256; ++b) total += hist[b];
      const int64_t protect = int64_t(hist[255]), entries = int64_t(total - hist[0]);
      r = r < protect ? protect : r > entries ? entries : r;
    }
    if (r == 0) {
      done = 1;
      return;
    }
    int b = 255;  // the highest byte whose keys, with those above, reach r
    for (int64_t above = 0;; --b) {
      if (b == 0 || above + int64_t(hist[b]) >= r) {
        r -= above;
        break;
      }
      above += int64_t(hist[b]);
    }
    prefix |= uint64_t(b) << shift, mask |= uint64_t(255) << shift;
  }
};

// How many keys equal to its pool's threshold each of `heads` table heads keeps: the pool's r
// shared out in table order over the heads' counts of such keys (every rank's summed).
KVTP_HOST_DEVICE inline void tieQuotas(const double* equal_counts, const int* pool_of, int heads,
                                       const RadixSelect* pools, int64_t* quota) {
  int64_t left = 0;
  for (int t = 0; t < heads; ++t) {
    if (t == 0 || pool_of[t] != pool_of[t - 1]) left = pools[pool_of[t]].done ? 0 : pools[pool_of[t]].r;
    const int64_t n = int64_t(equal_counts[t]);
    quota[t] = n < left ? n : left;
    left -= quota[t];
  }
}

}  // namespace kvtp::kernels
