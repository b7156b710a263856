// kvtp: evaluate and serve OPT / Llama models with a compressed KV cache.
#include <cstdio>

#include "comm/communicator.h"
#include "launcher/commands.h"
#include "runtime/error.h"

int main(int argc, char** argv) {
  CLI::App app{"kvtp: tensor-parallel LLM runtime with KV-cache compression"};
  app.require_subcommand(1);
  kvtp::launcher::addPplCommand(app);
  kvtp::launcher::addGenerateCommand(app);
  kvtp::launcher::addPasskeyCommand(app);
  kvtp::launcher::addBenchCommand(app);
  kvtp::launcher::addSweepCommand(app);
  kvtp::launcher::addQueryFiltersCommand(app);
  kvtp::launcher::addServiceCommands(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    // kvtp::Error and anything unexpected: one clear line; under mpirun the whole job ends with
    // this rank's message instead of leaving the other ranks waiting in a collective.
    kvtp::comm::abortJob(e.what());
  }
  return 0;
}
