// The kvtp subcommands. Each add*Command registers its options on the app and the action to run.
#pragma once
#include <CLI/CLI.hpp>

namespace kvtp::launcher {

void addPplCommand(CLI::App& app);
void addGenerateCommand(CLI::App& app);
void addPasskeyCommand(CLI::App& app);
void addBenchCommand(CLI::App& app);
void addSweepCommand(CLI::App& app);
void addQueryFiltersCommand(CLI::App& app);  // Q-Filters' calibration
void addServiceCommands(CLI::App& app);  // coordinator, worker, submit, jobs, watch, cancel

}  // namespace kvtp::launcher
