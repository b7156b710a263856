// The perplexity jobs several tests start from.
#pragma once
#include <string>

#include "runtime/ppl_job.h"
#include "test_util.h"

namespace kvtp::test {

// A fixture checkpoint (tests/fixtures/models/NAME) on its own input_ids.txt.
inline PplJob fixtureJob(const std::string& model, Mode mode) {
  PplJob j;
  j.model_dir = fixture("models/" + model);
  j.input_ids = j.model_dir + "/input_ids.txt";
  j.mode = mode;
  return j;
}

// The trained default model on the held-out C4 sample: `windows` windows of `seq_len` tokens.
inline PplJob heldOutC4Job(int seq_len, int windows, Mode mode) {
  PplJob j;
  j.model_dir = "models/kvtp-llama-2m";
  j.data = "data/c4/c4-heldout-200.json.gz";
  j.seq_len = seq_len;
  j.max_windows = windows;
  j.mode = mode;
  return j;
}

}  // namespace kvtp::test
