// Named model shapes (the published configs of OPT and Llama checkpoints) for synthetic-weight
// runs, and a reader that takes either such a name or a config.json path.
#pragma once
#include <string>
#include <vector>

#include "runtime/config.h"

namespace kvtp {

std::vector<std::string> presetNames();
// A preset name (opt-125m ... opt-66b, llama-2-7b, llama-2-70b, llama-3-8b, ...) or the path
// of a config.json file.
ModelConfig syntheticConfig(const std::string& name_or_path);

}  // namespace kvtp
