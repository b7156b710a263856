// The options of a generation job, shared by `kvtp generate` (runs it here) and
// `kvtp submit generate` (sends it to a coordinator).
#pragma once
#include <CLI/CLI.hpp>

#include "runtime/generate_job.h"

namespace kvtp::launcher {

struct GenerateOptions {
  GenerateJob job;
  int tp = 0;
};

void addGenerateOptions(CLI::App* cmd, GenerateOptions& o);

}  // namespace kvtp::launcher
