#include "runtime/torch_checkpoint.h"

#include <unzip.h>

#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "runtime/error.h"

namespace kvtp {
namespace {

// A member of the archive: where its bytes lie in the file (stored ones only) and whether it is
// stored uncompressed.
struct Member {
  uint64_t offset = 0, size = 0;
  bool stored = false;
};

// What the archive holds: its members by name, the folder they sit in ("archive" as torch.save
// names it), and the folder's data.pkl.
struct Archive {
  std::map<std::string, Member> members;
  std::string folder, pickle;
};

Archive readArchive(const std::string& path) {
  unzFile zip = unzOpen64(path.c_str());
  if (!zip)
    throw Error("'" + path + "' is not a zip archive: not a PyTorch checkpoint, or one saved before torch 1.6 (re-save "
                "it with a newer torch, or as safetensors)");
  std::unique_ptr<void, int (*)(unzFile)> closer(zip, unzClose);
  Archive a;
  for (int r = unzGoToFirstFile(zip); r == UNZ_OK; r = unzGoToNextFile(zip)) {
    unz_file_info64 info;
    char name[1024];
    if (unzGetCurrentFileInfo64(zip, &info, name, sizeof name, nullptr, 0, nullptr, 0) != UNZ_OK)
      throw Error("'" + path + "': a corrupt zip directory entry");
    if (unzOpenCurrentFile(zip) != UNZ_OK) throw Error("'" + path + "': cannot open member '" + name + "'");
    Member m{unzGetCurrentFileZStreamPos64(zip), info.uncompressed_size, info.compression_method == 0};
    const std::string n = name;
    if (n.size() >= 9 && n.compare(n.size() - 9, 9, "/data.pkl") == 0) {
      if (info.uncompressed_size > (uint64_t(1) << 30)) throw Error("'" + path + "': data.pkl is over 1 GiB");
      a.pickle.resize(info.uncompressed_size);
      if (unzReadCurrentFile(zip, a.pickle.data(), unsigned(a.pickle.size())) != int(a.pickle.size()))
        throw Error("'" + path + "': cannot read " + n + " (truncated archive?)");
      a.folder = n.substr(0, n.size() - 9);
    }
    unzCloseCurrentFile(zip);
    a.members[n] = m;
  }
  if (a.pickle.empty()) throw Error("'" + path + "' holds no data.pkl: not a PyTorch checkpoint");
  return a;
}

// What the unpickler's stack holds. Only the shapes a state_dict needs.
struct Value {
  enum Kind { None, Bool, Int, Float, String, Tuple, Dict, Global, Storage, Tensor, Mark } kind = None;
  int64_t i = 0;
  double f = 0;
  std::string s;                                    // String, Global ("module.name"), Storage's key
  std::vector<std::shared_ptr<Value>> items;        // Tuple (and list); Dict: key, value, key, ...
  std::optional<DType> dtype;                       // Storage, Tensor (and its storage type's Global):
                                                    // none for the integer types kvtp never reads
  int64_t offset = 0;                               // Tensor: in elements of its storage
  std::vector<int64_t> shape, stride;               // Tensor
};
using V = std::shared_ptr<Value>;

V make(Value::Kind k) {
  auto v = std::make_shared<Value>();
  v->kind = k;
  return v;
}

std::vector<int64_t> ints(const V& t, const std::string& what) {
  if (t->kind != Value::Tuple) throw Error(what + " is not a tuple");
  std::vector<int64_t> out;
  for (auto& x : t->items) {
    if (x->kind != Value::Int) throw Error(what + " holds a non-integer");
    out.push_back(x->i);
  }
  return out;
}

// A restricted pickle machine (protocols 2-4, the opcodes torch.save emits for a state_dict).
// Globals other than the ordered dict, the tensor rebuild and the storage types are refused when
// they are named, so nothing a pickle names is ever run.
class Unpickler {
 public:
  Unpickler(const std::string& bytes, const std::string& where) : p_(bytes), where_(where) {}

  V run() {
    while (true) {
      const uint8_t op = byte();
      switch (op) {
        case 0x80: byte(); break;                               // PROTO
        case 0x95: take(8); break;                              // FRAME
        case '}': push(make(Value::Dict)); break;               // EMPTY_DICT
        case ']': case ')': push(make(Value::Tuple)); break;    // EMPTY_LIST, EMPTY_TUPLE
        case '(': push(make(Value::Mark)); break;               // MARK
        case 'N': push(make(Value::None)); break;
        case 0x88: case 0x89: {                                  // NEWTRUE, NEWFALSE
          V b = make(Value::Bool);
          b->i = op == 0x88;
          push(b);
          break;
        }
        case 'J': pushInt(int32_t(le(4))); break;              // BININT
        case 'K': pushInt(le(1)); break;                       // BININT1
        case 'M': pushInt(le(2)); break;                       // BININT2
        case 0x8a: {                                            // LONG1
          const size_t n = byte();
          if (n > 8) throw bad("an integer of " + std::to_string(n) + " bytes");
          int64_t v = int64_t(le(n));
          if (n > 0 && n < 8 && (v >> (8 * n - 1)) & 1) v -= int64_t(1) << (8 * n);  // sign
          pushInt(v);
          break;
        }
        case 'G': {                                             // BINFLOAT (big-endian)
          uint64_t u = 0;
          for (int k = 0; k < 8; ++k) u = (u << 8) | byte();
          V f = make(Value::Float);
          std::memcpy(&f->f, &u, 8);
          push(f);
          break;
        }
        case 'X': pushString(take(le(4))); break;             // BINUNICODE
        case 0x8c: pushString(take(byte())); break;           // SHORT_BINUNICODE
        case 'T': pushString(take(le(4))); break;             // BINSTRING
        case 'U': pushString(take(byte())); break;            // SHORT_BINSTRING
        case 'c': {                                             // GLOBAL module\nname\n
          const std::string module = line(), name = line();
          push(global(module + "." + name));
          break;
        }
        case 0x93: {                                            // STACK_GLOBAL
          const V name = pop(), module = pop();
          if (name->kind != Value::String || module->kind != Value::String) throw bad("a global that is not named");
          push(global(module->s + "." + name->s));
          break;
        }
        case 'q': memo(byte()); break;                          // BINPUT
        case 'r': memo(le(4)); break;                           // LONG_BINPUT
        case 0x94: memo(memo_.size()); break;                   // MEMOIZE
        case 'h': push(recall(byte())); break;                  // BINGET
        case 'j': push(recall(le(4))); break;                   // LONG_BINGET
        case 't': {                                             // TUPLE
          V t = make(Value::Tuple);
          t->items = popToMark();
          push(t);
          break;
        }
        case 0x85: case 0x86: case 0x87: {                      // TUPLE1..3
          V t = make(Value::Tuple);
          t->items.resize(op - 0x84);
          for (size_t k = t->items.size(); k-- > 0;) t->items[k] = pop();
          push(t);
          break;
        }
        case 'a': {                                             // APPEND
          const V x = pop();
          top(Value::Tuple)->items.push_back(x);
          break;
        }
        case 'e': {                                             // APPENDS
          auto xs = popToMark();
          auto& list = top(Value::Tuple)->items;
          list.insert(list.end(), xs.begin(), xs.end());
          break;
        }
        case 's': {                                             // SETITEM
          const V v = pop(), k = pop();
          auto& d = top(Value::Dict)->items;
          d.push_back(k), d.push_back(v);
          break;
        }
        case 'u': {                                             // SETITEMS
          auto kv = popToMark();
          if (kv.size() % 2) throw bad("SETITEMS with an odd count");
          auto& d = top(Value::Dict)->items;
          d.insert(d.end(), kv.begin(), kv.end());
          break;
        }
        case 'b': pop(); break;                                 // BUILD: a dict's attributes (_metadata)
        case 'Q': push(persistent(pop())); break;               // BINPERSID
        case 'R': {                                             // REDUCE
          const V args = pop(), fn = pop();
          push(reduce(fn, args));
          break;
        }
        case '.': return pop();                                 // STOP
        default: {
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", op);
          throw bad(std::string("pickle opcode ") + hex + " (a state_dict never needs it)");
        }
      }
    }
  }

 private:
  Error bad(const std::string& what) const {
    return Error(where_ + ": data.pkl at byte " + std::to_string(at_) + ": " + what + "; refused");
  }
  uint8_t byte() {
    if (at_ >= p_.size()) throw bad("it ends early (truncated)");
    return uint8_t(p_[at_++]);
  }
  uint64_t le(size_t n) {
    uint64_t v = 0;
    for (size_t k = 0; k < n; ++k) v |= uint64_t(byte()) << (8 * k);
    return v;
  }
  std::string take(uint64_t n) {
    if (n > p_.size() - at_) throw bad("a string past its end (truncated)");
    at_ += n;
    return p_.substr(at_ - n, n);
  }
  std::string line() {
    const size_t end = p_.find('\n', at_);
    if (end == std::string::npos) throw bad("a global without its name (truncated)");
    std::string s = p_.substr(at_, end - at_);
    at_ = end + 1;
    return s;
  }
  void push(V v) {
    if (stack_.size() > 1000000) throw bad("a stack of over a million values");
    stack_.push_back(std::move(v));
  }
  V pop() {
    if (stack_.empty() || stack_.back()->kind == Value::Mark) throw bad("a value taken from an empty stack");
    V v = stack_.back();
    stack_.pop_back();
    return v;
  }
  V top(Value::Kind k) {
    if (stack_.empty() || stack_.back()->kind != k) throw bad("a value added to something that cannot hold it");
    return stack_.back();
  }
  std::vector<V> popToMark() {
    std::vector<V> out;
    while (!stack_.empty() && stack_.back()->kind != Value::Mark) out.insert(out.begin(), pop());
    if (stack_.empty()) throw bad("no MARK");
    stack_.pop_back();
    return out;
  }
  void pushInt(int64_t v) {
    V x = make(Value::Int);
    x->i = v;
    push(x);
  }
  void pushString(std::string s) {
    V x = make(Value::String);
    x->s = std::move(s);
    push(x);
  }
  void memo(uint64_t k) {
    if (stack_.empty()) throw bad("memoizing an empty stack");
    if (k > 10000000) throw bad("a memo index of " + std::to_string(k));
    if (memo_.size() <= k) memo_.resize(k + 1);
    memo_[k] = stack_.back();
  }
  V recall(uint64_t k) {
    if (k >= memo_.size() || !memo_[k]) throw bad("a memo entry never stored");
    return memo_[k];
  }

  // The globals a state_dict names; any other is refused here, before anything could call it.
  V global(const std::string& name) {
    // The storage types, with the dtype kvtp reads them as; integer ones (buffers such as position
    // ids) have none: accepted, never read.
    static const std::map<std::string, std::optional<DType>> storages = {
        {"torch.FloatStorage", DType::F32},     {"torch.HalfStorage", DType::F16},
        {"torch.BFloat16Storage", DType::BF16}, {"torch.DoubleStorage", DType::F64},
        {"torch.LongStorage", std::nullopt},    {"torch.IntStorage", std::nullopt},
        {"torch.ShortStorage", std::nullopt},   {"torch.CharStorage", std::nullopt},
        {"torch.ByteStorage", std::nullopt},    {"torch.BoolStorage", std::nullopt}};
    V g = make(Value::Global);
    g->s = name;
    if (auto it = storages.find(name); it != storages.end()) {
      g->dtype = it->second;
      return g;
    }
    if (name == "collections.OrderedDict" || name == "torch._utils._rebuild_tensor_v2") return g;
    throw bad("the global '" + name + "' (a state_dict names only collections.OrderedDict, "
              "torch._utils._rebuild_tensor_v2 and storage types)");
  }

  // ('storage', storage type, key, location, numel) -> the storage archive/data/<key>.
  V persistent(const V& id) {
    if (id->kind != Value::Tuple || id->items.size() != 5 || id->items[0]->kind != Value::String ||
        id->items[0]->s != "storage" || id->items[1]->kind != Value::Global || id->items[2]->kind != Value::String)
      throw bad("a persistent id that is not a storage");
    if (id->items[1]->s.find("Storage") == std::string::npos) throw bad("a storage of type " + id->items[1]->s);
    V st = make(Value::Storage);
    st->s = id->items[2]->s;
    st->dtype = id->items[1]->dtype;
    return st;
  }

  V reduce(const V& fn, const V& args) {
    if (fn->kind != Value::Global || args->kind != Value::Tuple) throw bad("a call that is not to a global");
    if (fn->s == "collections.OrderedDict") {
      if (!args->items.empty()) throw bad("an OrderedDict built from arguments");
      return make(Value::Dict);
    }
    if (fn->s != "torch._utils._rebuild_tensor_v2") throw bad("a call to " + fn->s);
    // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    if (args->items.size() < 4 || args->items[0]->kind != Value::Storage || args->items[1]->kind != Value::Int)
      throw bad("a tensor rebuilt from something other than a storage, offset, size and stride");
    V t = make(Value::Tensor);
    t->s = args->items[0]->s, t->dtype = args->items[0]->dtype;
    t->offset = args->items[1]->i;
    t->shape = ints(args->items[2], where_ + ": a tensor's size");
    t->stride = ints(args->items[3], where_ + ": a tensor's stride");
    if (t->shape.size() != t->stride.size() || t->offset < 0) throw bad("a tensor with a malformed size or offset");
    return t;
  }

  const std::string& p_;
  std::string where_;
  size_t at_ = 0;
  std::vector<V> stack_, memo_;
};

}  // namespace

TorchFile::TorchFile(const std::string& path) : TensorFile(path) {
  const Archive archive = readArchive(path);
  const V root = Unpickler(archive.pickle, "'" + path + "'").run();
  if (root->kind != Value::Dict) throw Error("'" + path + "': data.pkl does not hold a dict of tensors (a state_dict)");
  const uint8_t* base = mapped();
  const uint64_t size = mappedSize();
  for (size_t k = 0; k + 1 < root->items.size(); k += 2) {
    const V& key = root->items[k];
    const V& t = root->items[k + 1];
    if (key->kind != Value::String) throw Error("'" + path + "': a state_dict key that is not a string");
    if (t->kind != Value::Tensor) continue;  // not a tensor (kvtp reads only tensors)
    if (!t->dtype) continue;                 // integer buffers (position ids): never read by kvtp
    const std::string where = "'" + path + "': tensor '" + key->s + "'";
    TensorInfo info;
    info.dtype = *t->dtype;
    info.shape = t->shape;
    int64_t expect = 1;  // row-major strides, from the last dimension
    for (size_t d = t->shape.size(); d-- > 0;) {
      if (t->shape[d] < 0) throw Error(where + " has a negative size");
      if (t->shape[d] > 1 && t->stride[d] != expect)
        throw Error(where + " is not contiguous (strides " + shapeString(t->stride) + " for shape " +
                    shapeString(t->shape) + "); save its .contiguous() copy");
      if (t->shape[d] && expect > (int64_t(1) << 48) / t->shape[d]) throw Error(where + " has an impossible size");
      expect *= t->shape[d];
    }
    const auto m = archive.members.find(archive.folder + "/data/" + t->s);
    if (m == archive.members.end()) throw Error(where + " names storage " + t->s + ", which the archive lacks");
    if (!m->second.stored) throw Error(where + ": its storage is compressed in the zip (torch.save stores them as they are)");
    const uint64_t es = dtypeSize(info.dtype), bytes = uint64_t(info.numel()) * es;
    if (m->second.offset > size || m->second.size > size - m->second.offset)
      throw Error(where + ": its storage lies past the end of the file (truncated?)");
    if (uint64_t(t->offset) > m->second.size / es || bytes > m->second.size - uint64_t(t->offset) * es)
      throw Error(where + " reaches past the end of its storage (" + std::to_string(m->second.size) + " bytes)");
    info.data = base + m->second.offset + uint64_t(t->offset) * es;
    tensors_.emplace(key->s, info);
  }
}

}  // namespace kvtp
