// The options of a perplexity job, shared by `kvtp ppl` (runs it here) and `kvtp submit ppl`
// (sends it to a coordinator), so the two can never drift apart.
#pragma once
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "runtime/ppl_job.h"

namespace kvtp::launcher {

struct PplOptions {
  PplJob job;
  std::string mode = "prefill";
  std::string preset = "default";
  int tp = 0;
  // Options a preset sets unless the user gave them (CLI11 counts what was given).
  CLI::Option *seq_len = nullptr, *stride = nullptr, *max_windows = nullptr, *max_docs = nullptr, *join = nullptr,
              *drop_partial = nullptr, *mode_option = nullptr;
  PplJob resolve() const;  // the preset applied, explicit options on top, mode parsed
};

void addPplOptions(CLI::App* cmd, PplOptions& o);

}  // namespace kvtp::launcher
