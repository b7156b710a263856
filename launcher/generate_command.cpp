// kvtp generate: text (or token ids) from prompts through the compressed KV cache, streamed.
#include <cstdio>
#include <iostream>

#include "launcher/commands.h"
#include "launcher/generate_options.h"

namespace kvtp::launcher {

void addGenerateCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate text from prompts, greedy or sampled, through the KV cache");
  struct Args {
    GenerateOptions gen;
    bool json = false;
  };
  auto a = std::make_shared<Args>();
  addGenerateOptions(cmd, a->gen);
  cmd->add_flag("--json", a->json,
                "JSON lines: one per new token {sequence, id, text}, then the result object (ids, text, finish, ...)");

  cmd->callback([a] {
    const GenerateJob& j = a->gen.job;
    const comm::Topology topo = comm::makeTopology(a->gen.tp);
    const bool lead = topo.world_rank == 0;
    // One prompt streams its text as it comes; several print each whole, in order, at the end.
    const bool stream = lead && !a->json && j.prompts.size() == 1 && j.prompts_file.empty() && j.input_ids.empty();
    const GenerateJobResult r = runGenerateJob(j, &topo, [&](int sequence, int id, const std::string& text) {
      if (a->json && lead) {
        std::cout << nlohmann::json{{"sequence", sequence}, {"id", id}, {"text", text}}.dump(-1, ' ', false,
                                                                                              nlohmann::json::error_handler_t::replace)
                  << std::endl;
      } else if (stream) {
        std::cout << text << std::flush;
      }
    });
    if (!lead) return;
    if (a->json) {
      std::cout << toJson(j, r).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
      return;
    }
    for (size_t i = 0; i < r.sequences.size(); ++i) {
      const Generated& g = r.sequences[i];
      if (!stream) {
        if (r.sequences.size() > 1) std::cout << "--- " << i + 1 << " ---\n";
        if (!j.input_ids.empty()) {
          for (size_t k = 0; k < g.ids.size(); ++k) std::cout << (k ? " " : "") << g.ids[k];
        } else {
          std::cout << g.text;
        }
      }
      std::cout << "\n";
      std::fprintf(stderr, "[%zu new tokens, finish: %s]\n", g.ids.size(), g.finish.c_str());
    }
    const double full = double(std::max<int64_t>(r.kv_bytes_full, 1));
    std::fprintf(stderr, "%lld new tokens in %.2f s (%.1f tok/s), %s %s, tp %d, KV cache %s: held %.1f%%, peak %.1f%% "
                 "of the full fp16 cache\n", (long long)r.new_tokens, r.seconds, r.seconds > 0 ? r.new_tokens / r.seconds : 0.0,
                 j.device.c_str(), j.resolvedDtype().c_str(), r.tp, r.kv.c_str(), 100.0 * r.kv_bytes_steady / full,
                 100.0 * r.kv_bytes_peak / full);
  });
}

}  // namespace kvtp::launcher
