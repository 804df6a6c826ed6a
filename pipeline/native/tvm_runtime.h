// The TVM runtime, opened at run time (dlopen) and called through tvm-ffi's C ABI (tvm/ffi/c_api.h, the stable
// interface every TVM runtime library exports). Opened, not linked, so that a missing or wrong library is a clear
// error with exit code 1 instead of the dynamic loader's refusal to start the program, and so that the runner
// checks the bundle before any TVM code is loaded. Only five C functions are called; everything else is a
// registered global function of the runtime ("ffi.ModuleLoadFromFile", "runtime.TVMTensorAllocWithScope", ...).
#pragma once

#include <dlfcn.h>
#include <tvm/ffi/c_api.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace pipeline {
namespace detail {

// This machine cannot run the library: no TVM runtime, no device support, no device (exit code 1).
struct Unavailable : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An error raised inside TVM, with its kind and message.
struct TvmError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An owned tvm-ffi value: objects are released when it goes; PODs (ints, devices) are held as they are.
class Value {
 public:
  Value() { raw_.type_index = kTVMFFINone, raw_.zero_padding = 0, raw_.v_int64 = 0; }
  explicit Value(TVMFFIAny raw) : raw_(raw) {}
  Value(Value&& other) noexcept : raw_(other.raw_) { other.raw_.type_index = kTVMFFINone; }
  Value& operator=(Value&& other) noexcept {
    std::swap(raw_, other.raw_);
    return *this;
  }
  Value(const Value&) = delete;
  Value& operator=(const Value&) = delete;
  ~Value();

  int32_t type() const { return raw_.type_index; }
  bool is_object() const { return raw_.type_index >= kTVMFFIStaticObjectBegin; }
  TVMFFIObjectHandle handle() const { return is_object() ? raw_.v_obj : nullptr; }
  int64_t integer() const { return raw_.v_int64; }
  // A borrowed view, to pass as an argument.
  TVMFFIAny view() const { return raw_; }
  // The i-th item of an ffi Array (a VM function's tuple result), borrowed from it.
  TVMFFIAny item(int64_t i) const { return static_cast<TVMFFIAny*>(seq()->data)[i]; }
  int64_t size() const { return seq()->size; }

 private:
  // An Array's cell follows its object header (c_api.h: "ArrayObj and ListObj both inherit from this cell").
  TVMFFISeqCell* seq() const {
    return reinterpret_cast<TVMFFISeqCell*>(reinterpret_cast<char*>(raw_.v_obj) + sizeof(TVMFFIObject));
  }

  TVMFFIAny raw_;
};

inline TVMFFIAny arg_int(int64_t v) { TVMFFIAny a{}; a.type_index = kTVMFFIInt; a.v_int64 = v; return a; }
inline TVMFFIAny arg_bool(bool v) { TVMFFIAny a{}; a.type_index = kTVMFFIBool; a.v_int64 = v; return a; }
inline TVMFFIAny arg_str(const char* v) { TVMFFIAny a{}; a.type_index = kTVMFFIRawStr; a.v_c_str = v; return a; }
inline TVMFFIAny arg_ptr(const void* v) {
  TVMFFIAny a{}; a.type_index = kTVMFFIOpaquePtr; a.v_ptr = const_cast<void*>(v); return a;
}
inline TVMFFIAny arg_device(DLDevice v) { TVMFFIAny a{}; a.type_index = kTVMFFIDevice; a.v_device = v; return a; }
inline TVMFFIAny arg_dtype(DLDataType v) { TVMFFIAny a{}; a.type_index = kTVMFFIDataType; a.v_dtype = v; return a; }
inline TVMFFIAny arg_none() { TVMFFIAny a{}; a.type_index = kTVMFFINone; return a; }

// The runtime libraries of one process: libtvm_ffi.so, libtvm_runtime.so and, on demand, a device's.
class Tvm {
 public:
  // Loaded once. Where: each directory of $TVM_LIBRARY_PATH (':'-separated), then the dynamic loader's own search
  // (LD_LIBRARY_PATH, /etc/ld.so.cache, /lib, /usr/lib). Unavailable says what was tried.
  static Tvm& get() {
    static Tvm* tvm = new Tvm();  // never destroyed: a Model in a static may outlive any other static
    return *tvm;
  }

  // Registers ``device`` ("cpu": built in; "cuda": libtvm_runtime_cuda.so beside libtvm_runtime.so) and checks
  // that the runtime sees one; Unavailable otherwise.
  DLDevice device(const std::string& device) {
    if (device == "cpu") return DLDevice{kDLCPU, 0};
    if (device != "cuda")
      throw Unavailable("the runner knows devices cpu and cuda, not " + device + "; run this artifact with run.py");
    DLDevice dev{kDLCUDA, 0};
    if (!has_global("device_api.cuda")) {
      std::string tried;
      if (!open_library("libtvm_runtime_" + device + ".so", runtime_dir_, &tried) || !has_global("device_api.cuda"))
        throw Unavailable("this TVM runtime (" + runtime_dir_ + ") has no cuda support (" + tried +
                          "); on a Jetson, build TVM's CUDA runtime against the board's CUDA "
                          "(scripts/build_tvm_runtime_on_jetson.sh, see docs/deploy.md)");
    }
    Value exists = call(global("runtime.GetDeviceAttr"), {arg_int(dev.device_type), arg_int(0), arg_int(0)});
    if (!exists.integer()) throw Unavailable("no cuda device found by the TVM runtime on this machine");
    return dev;
  }

  Value global(const char* name) {
    TVMFFIObjectHandle f = nullptr;
    TVMFFIByteArray key{name, std::strlen(name)};
    if (api_.get_global(&key, &f) != 0) raised(name);
    if (!f) throw TvmError(std::string("the TVM runtime has no function ") + name);
    TVMFFIAny any{};
    any.type_index = kTVMFFIFunction, any.v_obj = static_cast<TVMFFIObject*>(f);
    return Value(any);
  }

  Value call(const Value& function, std::initializer_list<TVMFFIAny> args, const char* what = nullptr) {
    std::vector<TVMFFIAny> list(args);
    return call(function, list.data(), static_cast<int32_t>(list.size()), what);
  }
  Value call(const Value& function, TVMFFIAny* args, int32_t count, const char* what = nullptr) {
    TVMFFIAny result{};
    result.type_index = kTVMFFINone;
    if (api_.call(function.handle(), args, count, &result) != 0) raised(what ? what : "a TVM call");
    return Value(result);
  }

  void release(TVMFFIObjectHandle handle) { api_.dec_ref(handle); }

  const std::string& runtime_dir() const { return runtime_dir_; }

 private:
  struct Api {
    decltype(&::TVMFFIFunctionGetGlobal) get_global = nullptr;
    decltype(&::TVMFFIFunctionCall) call = nullptr;
    decltype(&::TVMFFIObjectDecRef) dec_ref = nullptr;
    decltype(&::TVMFFIErrorMoveFromRaised) move_error = nullptr;
    decltype(&::TVMFFIGetVersion) version = nullptr;
  };

  Tvm() {
    std::string tried;
    void* ffi = open_library("libtvm_ffi.so", "", &tried);
    void* runtime = ffi ? open_library("libtvm_runtime.so", dir_of(ffi), &tried) : nullptr;
    if (!runtime)
      throw Unavailable("cannot load the TVM runtime (" + tried +
                        "): the runner needs libtvm_runtime.so and libtvm_ffi.so of apache-tvm 0.27 for this CPU; "
                        "put them in a directory named by TVM_LIBRARY_PATH, or on the loader's path (docs/deploy.md)");
    runtime_dir_ = dir_of(runtime);
    api_.get_global = reinterpret_cast<decltype(api_.get_global)>(dlsym(ffi, "TVMFFIFunctionGetGlobal"));
    api_.call = reinterpret_cast<decltype(api_.call)>(dlsym(ffi, "TVMFFIFunctionCall"));
    api_.dec_ref = reinterpret_cast<decltype(api_.dec_ref)>(dlsym(ffi, "TVMFFIObjectDecRef"));
    api_.move_error = reinterpret_cast<decltype(api_.move_error)>(dlsym(ffi, "TVMFFIErrorMoveFromRaised"));
    api_.version = reinterpret_cast<decltype(api_.version)>(dlsym(ffi, "TVMFFIGetVersion"));
    if (!api_.get_global || !api_.call || !api_.dec_ref || !api_.move_error || !api_.version)
      throw Unavailable("libtvm_ffi.so in " + dir_of(ffi) + " lacks tvm-ffi's C functions: not tvm-ffi's library");
    TVMFFIVersion v;
    api_.version(&v);
    // The C ABI is promised within a minor version (0.1.x); this runner was compiled against the headers below.
    if (v.major != TVM_FFI_VERSION_MAJOR || v.minor != TVM_FFI_VERSION_MINOR)
      throw Unavailable("libtvm_ffi.so is tvm-ffi " + std::to_string(v.major) + "." + std::to_string(v.minor) + "." +
                        std::to_string(v.patch) + "; this runner was built for tvm-ffi " +
                        std::to_string(TVM_FFI_VERSION_MAJOR) + "." + std::to_string(TVM_FFI_VERSION_MINOR) +
                        ".x: install the runtime of apache-tvm-ffi 0.1.14 (docs/deploy.md)");
  }

  // dlopen ``file`` (RTLD_GLOBAL: the model library resolves TVM's symbols from the global scope) from ``first``
  // (if any), then TVM_LIBRARY_PATH's directories, then the loader's search; appends each failure to ``tried``.
  static void* open_library(const std::string& file, const std::string& first, std::string* tried) {
    std::vector<std::string> candidates;
    auto add = [&](const std::string& path) {
      if (std::find(candidates.begin(), candidates.end(), path) == candidates.end()) candidates.push_back(path);
    };
    if (!first.empty()) add(first + "/" + file);
    if (const char* env = std::getenv("TVM_LIBRARY_PATH")) {
      std::string dirs = env;
      for (size_t start = 0; start <= dirs.size();) {
        size_t end = dirs.find(':', start);
        if (end == std::string::npos) end = dirs.size();
        if (end > start) add(dirs.substr(start, end - start) + "/" + file);
        start = end + 1;
      }
    }
    add(file);  // the loader's search path
    for (const auto& path : candidates) {
      if (void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) return handle;
      const char* why = dlerror();
      *tried += (tried->empty() ? "" : "; ") + std::string(why ? why : path.c_str());
    }
    return nullptr;
  }

  static std::string dir_of(void* handle) {
    char path[4096] = {0};
    if (!handle || dlinfo(handle, RTLD_DI_ORIGIN, path) != 0) return "";
    return path;
  }

  bool has_global(const char* name) {
    TVMFFIObjectHandle f = nullptr;
    TVMFFIByteArray key{name, std::strlen(name)};
    if (api_.get_global(&key, &f) != 0) {
      TVMFFIObjectHandle error = nullptr;
      api_.move_error(&error);
      if (error) api_.dec_ref(error);
      return false;
    }
    if (f) api_.dec_ref(f);
    return f != nullptr;
  }

  [[noreturn]] void raised(const char* what) {
    TVMFFIObjectHandle error = nullptr;
    api_.move_error(&error);
    std::string message = std::string(what) + " failed";
    if (error) {
      TVMFFIErrorCell* cell = TVMFFIErrorGetCellPtr(error);
      message += ": " + std::string(cell->kind.data, cell->kind.size) + ": " +
                 std::string(cell->message.data, cell->message.size);
      api_.dec_ref(error);
    }
    throw TvmError(message);
  }

  Api api_;
  std::string runtime_dir_;
};

inline Value::~Value() {
  if (is_object()) Tvm::get().release(raw_.v_obj);
}

}  // namespace detail
}  // namespace pipeline
