// Reads Hugging Face checkpoints: one model.safetensors, or shards listed by
// model.safetensors.index.json; or PyTorch's pytorch_model.bin, or its shards listed by
// pytorch_model.bin.index.json (runtime/torch_checkpoint.h). Files are memory-mapped; a tensor
// (or a slice of one, for tensor parallelism) is converted to float32 on read, so only the bytes
// asked for are touched.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace kvtp {

enum class DType { F32, F16, BF16, F64 };
size_t dtypeSize(DType t);
const char* dtypeName(DType t);

struct TensorInfo {
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping
  int64_t numel() const;
};

// One memory-mapped checkpoint file: its tensors, each a contiguous row-major view into the
// mapping, validated against the file's size when the file is opened. The mapping belongs to
// this base, so it is released also when a format's constructor throws.
class TensorFile {
 public:
  virtual ~TensorFile();
  TensorFile(const TensorFile&) = delete;
  TensorFile& operator=(const TensorFile&) = delete;

  const std::string& path() const { return path_; }
  const TensorInfo* find(const std::string& name) const;
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }

 protected:
  explicit TensorFile(const std::string& path);  // maps the whole file read-only
  const uint8_t* mapped() const { return static_cast<const uint8_t*>(map_); }
  size_t mappedSize() const { return size_; }

  std::string path_;
  std::map<std::string, TensorInfo> tensors_;

 private:
  void* map_ = nullptr;
  size_t size_ = 0;
};

// A .safetensors file, its header validated against the file size.
class SafetensorsFile : public TensorFile {
 public:
  explicit SafetensorsFile(const std::string& path);
};

// The file's reader by its name: .safetensors, or PyTorch's .bin.
std::unique_ptr<TensorFile> openTensorFile(const std::string& path);

// A contiguous range [begin, end) along one dimension (0 = rows, 1 = columns); dim -1 = whole.
struct Slice {
  int dim = -1;
  int64_t begin = 0, end = 0;
};

class Checkpoint {
 public:
  explicit Checkpoint(const std::string& model_dir);
  ~Checkpoint();

  bool has(const std::string& name) const;
  std::vector<std::string> names() const;
  const TensorInfo& info(const std::string& name) const;  // dtype and full shape
  // The tensor as float32, after checking that its full shape is `shape`; with a slice, only
  // that part is read and returned (row-major).
  std::vector<float> read(const std::string& name, const std::vector<int64_t>& shape,
                          Slice slice = {}) const;
  // Bytes of stored tensor data read so far (to prove shard-only loading).
  uint64_t bytesRead() const { return bytes_read_; }
  uint64_t bytesStored() const;  // all tensor bytes of the checkpoint

 private:
  const TensorFile& file(const std::string& name) const;
  std::string dir_;
  std::map<std::string, std::string> weight_map_;  // tensor -> file name
  mutable std::map<std::string, std::unique_ptr<TensorFile>> files_;
  mutable uint64_t bytes_read_ = 0;
};

// Half-precision conversions (exact; used by the loader and by tests).
float halfToFloat(uint16_t h);
float bfloat16ToFloat(uint16_t b);
uint16_t floatToHalf(float f);
uint16_t floatToBfloat16(float f);

}  // namespace kvtp
