// A one-line progress bar on stderr (windows, tokens, tok/s, ETA, running ppl), drawn only when
// stderr is a terminal so that logs and pipes stay clean.
#pragma once
#include "runtime/perplexity.h"

namespace kvtp::launcher {

class ProgressBar {
 public:
  explicit ProgressBar(bool enabled);
  void update(const Progress& p);
  void finish();

 private:
  bool enabled_;
  bool drawn_ = false;
  double last_draw_ = -1;
};

}  // namespace kvtp::launcher
