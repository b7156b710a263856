// Reads PyTorch checkpoints as `torch.save` writes them (pytorch_model.bin, or shards listed by
// pytorch_model.bin.index.json) without Python: the zip archive (minizip) is memory-mapped, its
// data.pkl read by a restricted unpickler that accepts only what a state_dict holds — an ordered
// dict of name -> tensor rebuilt from a storage, offset, size and stride — and refuses any other
// global or opcode before anything runs. Each storage member is stored uncompressed, so a tensor's
// bytes are a view into the mapping, read (and converted) only when asked for, as safetensors'.
#pragma once
#include <map>
#include <string>

#include "runtime/safetensors.h"

namespace kvtp {

class TorchFile : public TensorFile {
 public:
  explicit TorchFile(const std::string& path);
};

}  // namespace kvtp
