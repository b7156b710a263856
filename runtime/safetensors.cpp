#include "runtime/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "runtime/error.h"
#include "runtime/torch_checkpoint.h"

namespace kvtp {
namespace fs = std::filesystem;

size_t dtypeSize(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16:
    case DType::BF16: return 2;
    case DType::F64: return 8;
  }
  return 0;
}

const char* dtypeName(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F64: return "F64";
  }
  return "?";
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

float halfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bfloat16ToFloat(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t floatToBfloat16(float f) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return uint16_t((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fff + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

uint16_t floatToHalf(float f) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000);
  const uint32_t absb = bits & 0x7fffffff;
  if (absb > 0x7f800000) return sign | 0x7e00;
  if (absb >= 0x477ff000) return sign | 0x7c00;  // overflow to inf
  if (absb < 0x38800000) {                      // subnormal or zero
    float a;
    std::memcpy(&a, &absb, 4);
    return sign | uint16_t(std::nearbyint(a * 16777216.0f));  // a / 2^-24
  }
  uint32_t r = absb + 0xfff + ((absb >> 13) & 1) - (uint32_t(112) << 23);
  return sign | uint16_t(r >> 13);
}

TensorFile::TensorFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error("cannot open '" + path + "': " + std::strerror(errno));
  struct stat st {};
  ::fstat(fd, &st);
  size_ = size_t(st.st_size);
  if (size_ > 0) map_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);  // an empty file maps nothing
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw Error("cannot map '" + path + "'");
  }
}

TensorFile::~TensorFile() {
  if (map_) ::munmap(map_, size_);
}

SafetensorsFile::SafetensorsFile(const std::string& path) : TensorFile(path) {
  const size_t size = mappedSize();
  if (size < 8)
    throw Error("'" + path + "' is truncated: " + std::to_string(size) + " bytes, no safetensors header");
  const uint8_t* base = mapped();
  uint64_t header_len;
  std::memcpy(&header_len, base, 8);
  if (header_len > size - 8)
    throw Error("'" + path + "' is truncated or not safetensors: header of " + std::to_string(header_len) +
                " bytes in a file of " + std::to_string(size));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(base + 8, base + 8 + header_len);
  } catch (const nlohmann::json::exception& e) {
    throw Error("'" + path + "' has a corrupt safetensors header: " + e.what());
  }
  const uint8_t* data = base + 8 + header_len;
  const size_t data_size = size - 8 - header_len;
  for (auto& [name, t] : header.items()) {
    if (name == "__metadata__") continue;
    const auto where = "'" + path + "': tensor '" + name + "'";
    try {
      const auto dt = t.at("dtype").get<std::string>();
      TensorInfo info;
      if (dt == "F32") info.dtype = DType::F32;
      else if (dt == "F16") info.dtype = DType::F16;
      else if (dt == "BF16") info.dtype = DType::BF16;
      else if (dt == "F64") info.dtype = DType::F64;
      else throw Error(where + " has dtype " + dt + "; supported: F32, F16, BF16, F64");
      info.shape = t.at("shape").get<std::vector<int64_t>>();
      const auto off = t.at("data_offsets").get<std::vector<uint64_t>>();
      if (off.size() != 2 || off[0] > off[1] || off[1] > data_size)
        throw Error(where + " lies outside the file (truncated? data is " + std::to_string(data_size) +
                    " bytes)");
      if (off[1] - off[0] != uint64_t(info.numel()) * dtypeSize(info.dtype))
        throw Error(where + " has " + std::to_string(off[1] - off[0]) + " bytes, expected " +
                    std::to_string(info.numel() * dtypeSize(info.dtype)) + " for shape " +
                    shapeString(info.shape));
      info.data = data + off[0];
      tensors_.emplace(name, info);
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + " has a malformed header entry: " + e.what());
    }
  }
}

const TensorInfo* TensorFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

std::unique_ptr<TensorFile> openTensorFile(const std::string& path) {
  if (path.size() >= 4 && path.compare(path.size() - 4, 4, ".bin") == 0) return std::make_unique<TorchFile>(path);
  return std::make_unique<SafetensorsFile>(path);
}

Checkpoint::Checkpoint(const std::string& model_dir) : dir_(model_dir) {
  const fs::path dir(model_dir);
  // safetensors first (the format Hugging Face writes by default), then PyTorch's pickles.
  for (const char* single : {"model.safetensors", "pytorch_model.bin"}) {
    const auto index = dir / (std::string(single) + ".index.json");
    if (fs::exists(index)) {
      std::ifstream in(index);
      try {
        auto j = nlohmann::json::parse(in);
        for (auto& [name, file] : j.at("weight_map").items()) weight_map_[name] = file.get<std::string>();
      } catch (const nlohmann::json::exception& e) {
        throw Error("'" + index.string() + "' is not a valid checkpoint index: " + e.what());
      }
      for (auto& [name, file] : weight_map_)
        if (file.find('/') != std::string::npos || !fs::exists(dir / file))
          throw Error("'" + index.string() + "' names shard '" + file + "' (for '" + name + "'), which is missing");
      return;
    }
    if (fs::exists(dir / single)) {
      auto& f = files_[single];
      f = openTensorFile((dir / single).string());
      for (auto& [name, info] : f->tensors()) weight_map_[name] = single;
      return;
    }
  }
  throw Error("'" + model_dir + "' has no model.safetensors, pytorch_model.bin or an index of their shards");
}

Checkpoint::~Checkpoint() = default;

bool Checkpoint::has(const std::string& name) const { return weight_map_.count(name) > 0; }

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> n;
  for (auto& [name, file] : weight_map_) n.push_back(name);
  return n;
}

const TensorInfo& Checkpoint::info(const std::string& name) const {
  const TensorInfo* t = file(name).find(name);
  if (!t) throw Error("'" + dir_ + "': tensor '" + name + "' is missing from its shard");
  return *t;
}

const TensorFile& Checkpoint::file(const std::string& name) const {
  auto it = weight_map_.find(name);
  if (it == weight_map_.end()) throw Error("'" + dir_ + "': tensor '" + name + "' is missing");
  auto& f = files_[it->second];
  if (!f) f = openTensorFile((fs::path(dir_) / it->second).string());
  return *f;
}

uint64_t Checkpoint::bytesStored() const {
  uint64_t total = 0;
  for (auto& [name, file_name] : weight_map_) {
    const auto* t = file(name).find(name);
    if (t) total += t->numel() * dtypeSize(t->dtype);
  }
  return total;
}

namespace {
template <class Word, class F>
void convertEach(const uint8_t* src, int64_t n, float* dst, F&& f) {
  for (int64_t i = 0; i < n; ++i) {
    Word w;
    std::memcpy(&w, src + sizeof(Word) * i, sizeof(Word));  // unaligned-safe
    dst[i] = f(w);
  }
}

void convert(const uint8_t* src, DType dt, int64_t n, float* dst) {
  switch (dt) {
    case DType::F32: std::memcpy(dst, src, size_t(n) * 4); break;
    case DType::F16: convertEach<uint16_t>(src, n, dst, halfToFloat); break;
    case DType::BF16: convertEach<uint16_t>(src, n, dst, bfloat16ToFloat); break;
    case DType::F64: convertEach<double>(src, n, dst, [](double d) { return float(d); }); break;
  }
}
}  // namespace

std::vector<float> Checkpoint::read(const std::string& name, const std::vector<int64_t>& shape,
                                    Slice slice) const {
  const auto& f = file(name);
  const TensorInfo* t = f.find(name);
  if (!t) throw Error("'" + f.path() + "': tensor '" + name + "' is missing (the index names this file)");
  if (t->shape != shape)
    throw Error("tensor '" + name + "' in '" + f.path() + "' has shape " + shapeString(t->shape) +
                ", expected " + shapeString(shape));
  const size_t es = dtypeSize(t->dtype);
  if (slice.dim < 0) {
    std::vector<float> out(size_t(t->numel()));
    convert(t->data, t->dtype, t->numel(), out.data());
    bytes_read_ += out.size() * es;
    return out;
  }
  if (slice.dim >= int(shape.size()) || slice.begin < 0 || slice.end > shape[slice.dim] || slice.begin >= slice.end)
    throw Error("tensor '" + name + "': slice [" + std::to_string(slice.begin) + ", " + std::to_string(slice.end) +
                ") of dim " + std::to_string(slice.dim) + " is outside shape " + shapeString(shape));
  // View the tensor as (outer, dim, inner) and copy [begin, end) of the middle axis.
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < slice.dim; ++d) outer *= shape[d];
  for (size_t d = slice.dim + 1; d < shape.size(); ++d) inner *= shape[d];
  const int64_t len = slice.end - slice.begin, dim = shape[slice.dim];
  std::vector<float> out(size_t(outer * len * inner));
  for (int64_t o = 0; o < outer; ++o)
    convert(t->data + ((o * dim + slice.begin) * inner) * es, t->dtype, len * inner,
            out.data() + o * len * inner);
  bytes_read_ += out.size() * es;
  return out;
}

}  // namespace kvtp
