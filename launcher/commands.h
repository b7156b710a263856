// The kvtp subcommands. Each add*Command registers its options on the app and the action to run.
#pragma once
#include <CLI/CLI.hpp>

namespace kvtp::launcher {

void addPplCommand(CLI::App& app);
void addBenchCommand(CLI::App& app);

}  // namespace kvtp::launcher
