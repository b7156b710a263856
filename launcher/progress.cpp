#include "launcher/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>

namespace kvtp::launcher {

ProgressBar::ProgressBar(bool enabled) : enabled_(enabled && isatty(STDERR_FILENO)) {}

void ProgressBar::update(const Progress& p) {
  if (!enabled_) return;
  const bool done = p.windows_done == p.windows_total;
  if (!done && p.seconds - last_draw_ < 0.2) return;  // redraw at most 5 times a second
  last_draw_ = p.seconds;
  const double frac = p.tokens_total ? double(p.tokens_done) / p.tokens_total : 0;
  constexpr int kWidth = 24;
  char bar[kWidth + 1];
  for (int i = 0; i < kWidth; ++i) bar[i] = i < int(frac * kWidth) ? '#' : '.';
  bar[kWidth] = 0;
  const double tps = p.seconds > 0 ? p.tokens_done / p.seconds : 0;
  const int eta = tps > 0 ? int((p.tokens_total - p.tokens_done) / tps) : 0;
  const double ppl = p.tokens_done ? std::exp(p.nll / p.tokens_done) : 0;
  std::fprintf(stderr, "\r[%s] %d/%d windows  %lld/%lld tok  %.0f tok/s  ETA %d:%02d  ppl %.3f\033[K", bar,
               p.windows_done, p.windows_total, (long long)p.tokens_done, (long long)p.tokens_total, tps, eta / 60,
               eta % 60, ppl);
  drawn_ = true;
}

void ProgressBar::finish() {
  if (drawn_) std::fputc('\n', stderr);
  drawn_ = false;
}

}  // namespace kvtp::launcher
