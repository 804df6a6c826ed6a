// The C++ API of pipeline_runner.h: a bundle's checks (what pipeline/runtime.py does before it loads anything),
// then the Relax VM through the TVM runtime's C ABI (tvm_runtime.h).
#include "pipeline_runner.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "json.h"
#include "npz.h"
#include "sha256.h"
#include "signature.h"
#include "tvm_runtime.h"

namespace pipeline {

using detail::Json;
using detail::NpyArray;
using detail::NpzFile;
using detail::Tvm;
using detail::Value;

namespace {

const int kSchema = 3;  // pipeline.runtime.MANIFEST_SCHEMA
const char* kManifest = "manifest.json";
const char* kSeal = "manifest.sha256";
const char* kSignature = "manifest.sig";
const char* kLibrary = "lib.so";
// What a run reads besides the manifest (pipeline.runtime.RUN_FILES); files a check skips: the manifest, its seal
// and signature, and run.py (the code the user chose to run; the native runner is listed in the manifest).
const char* kRunFiles[] = {"lib.so", "params.npz", "inputs.npz", "outputs.npz"};
const char* kUnlisted[] = {"manifest.json", "manifest.sha256", "manifest.sig", "run.py"};
const char* kIntact = "; use an intact copy (or compile it again)";

#if defined(__x86_64__)
const char* kArch = "x86_64";
#elif defined(__aarch64__)
const char* kArch = "aarch64";
#else
#error "the runner is built for x86_64 or aarch64"
#endif

[[noreturn]] void bad(const std::string& message) { throw Error(ErrorKind::kBadInput, message); }
[[noreturn]] void unavailable(const std::string& message) { throw Error(ErrorKind::kUnavailable, message); }

bool read_file(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::ostringstream s;
  s << f.rdbuf();
  *out = s.str();
  return !f.bad();
}

// The architecture an ELF file was built for (as uname spells it), or "" when it is no ELF file.
std::string elf_arch(const std::string& path) {
  std::string head(20, '\0');
  std::ifstream f(path, std::ios::binary);
  if (!f.read(&head[0], 20) || head.compare(0, 4, "\x7f" "ELF") != 0) return "";
  bool little = head[5] == 1;
  int machine = uint8_t(head[little ? 18 : 19]) | uint8_t(head[little ? 19 : 18]) << 8;
  if (machine == 62) return "x86_64";
  if (machine == 183) return "aarch64";
  return "ELF machine " + std::to_string(machine);
}

DLDataType parse_dtype(const std::string& name) {
  static const std::pair<const char*, DLDataType> known[] = {
      {"float32", {kDLFloat, 32, 1}}, {"float16", {kDLFloat, 16, 1}}, {"float64", {kDLFloat, 64, 1}},
      {"int8", {kDLInt, 8, 1}},       {"int16", {kDLInt, 16, 1}},     {"int32", {kDLInt, 32, 1}},
      {"int64", {kDLInt, 64, 1}},     {"uint8", {kDLUInt, 8, 1}},     {"uint16", {kDLUInt, 16, 1}},
      {"uint32", {kDLUInt, 32, 1}},   {"uint64", {kDLUInt, 64, 1}},   {"bool", {kDLBool, 8, 1}}};
  for (const auto& k : known)
    if (name == k.first) return k.second;
  bad("dtype " + name + " is not one the runner reads");
}

double half_to_double(uint16_t h) {
  int exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  double magnitude = exponent == 0    ? std::ldexp(mantissa, -24)
                     : exponent == 31 ? (mantissa ? NAN : INFINITY)
                                      : std::ldexp(mantissa + 1024, exponent - 25);
  return (h & 0x8000) ? -magnitude : magnitude;
}

// ``count`` elements of ``dtype`` as doubles (what the comparison computes in, like numpy's float64).
std::vector<double> to_doubles(const uint8_t* p, size_t count, DLDataType t) {
  std::vector<double> out(count);
  for (size_t i = 0; i < count; ++i) {
    const uint8_t* e = p + i * (t.bits / 8);
    if (t.code == kDLFloat && t.bits == 32) { float v; std::memcpy(&v, e, 4); out[i] = v; }
    else if (t.code == kDLFloat && t.bits == 64) { std::memcpy(&out[i], e, 8); }
    else if (t.code == kDLFloat && t.bits == 16) { uint16_t v; std::memcpy(&v, e, 2); out[i] = half_to_double(v); }
    else {
      int64_t v = 0;  // integers (and bool), little-endian, sign-extended for kDLInt
      std::memcpy(&v, e, t.bits / 8);
      if (t.code == kDLInt && t.bits < 64 && (v >> (t.bits - 1)) & 1) v -= int64_t(1) << t.bits;
      out[i] = static_cast<double>(v);
    }
  }
  return out;
}

std::vector<TensorSpec> tensor_specs(const Json& list) {
  std::vector<TensorSpec> specs;
  for (const Json& t : list.array()) {
    TensorSpec spec{t.at("name").string(), {}, t.at("dtype").string()};
    for (const Json& d : t.at("shape").array()) spec.shape.push_back(d.integer());
    specs.push_back(spec);
  }
  return specs;
}

// The cores the library was compiled for: its LLVM target's (or a CUDA target's host's) num-cores; 0 if unknown.
int target_cores(const Json& target) {
  for (const char* key : {"tvm_target", "tvm_host"}) {
    const Json* spec = target.find(key);
    const Json* kind = spec ? spec->find("kind") : nullptr;
    const Json* cores = spec ? spec->find("num-cores") : nullptr;
    if (kind && kind->is(Json::Type::kString) && kind->string() == "llvm" && cores && cores->is(Json::Type::kNumber))
      return static_cast<int>(cores->integer());
  }
  return 0;
}

std::string format(const char* fmt, double a, double b = 0, double c = 0, double d = 0) {
  char line[256];
  std::snprintf(line, sizeof line, fmt, a, b, c, d);
  return line;
}

}  // namespace

size_t TensorSpec::nbytes() const {
  size_t n = parse_dtype(dtype).bits / 8;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

std::string OutputCheck::describe() const {
  return name + format(": max_abs %.3g, allclose %.3g of 1 (|a-b| <= atol %g + rtol %g |b|) ", max_abs, allclose,
                       atol, rtol) + (passed ? "ok" : "FAILED");
}

struct Model::Impl {
  std::string dir, name, target, build_id, device_name;
  bool is_signed = false, signature_checked = false;
  std::vector<TensorSpec> inputs, outputs;
  double atol = 0, rtol = 0;
  DLDevice device{kDLCPU, 0};
  Value library, vm, main, copy_from, copy_to, sync, num_threads;
  std::vector<Value> tensors;    // the inputs, then the weights: main's arguments
  std::vector<TVMFFIAny> args;   // views of them, passed to every call
  Value result;                  // what the last run returned: a tensor, or an array of them
  std::vector<TVMFFIAny> results;
  bool ran = false;

  std::string path(const std::string& file) const { return dir + "/" + file; }

  // manifest.json, once it matches its seal (and, with a key, its signature).
  Json read_manifest(const std::string& public_key) {
    std::string text;
    Json manifest;
    try {
      if (!read_file(path(kManifest), &text)) throw std::runtime_error(std::strerror(errno));
      manifest = Json::parse(text);
    } catch (const std::exception& e) {
      bad(dir + " has no readable " + kManifest + " (" + e.what() +
          "); give an artifact directory or a bundle from `python -m pipeline package`");
    }
    const Json* schema = manifest.find("schema");
    if (!schema || !schema->is(Json::Type::kNumber) || schema->number() != kSchema)
      bad(dir + ": its manifest has schema " +
          (schema && schema->is(Json::Type::kNumber) ? format("%g", schema->number()) : std::string("None")) +
          ", this runtime reads schema " + std::to_string(kSchema) +
          "; compile the model again with this version of pipeline");
    std::string seal;
    if (!read_file(path(kSeal), &seal) || seal.size() < 64)
      bad(dir + " has no " + kSeal + ", so its manifest cannot be checked" + kIntact);
    // The seal, not the build_id: recomputing that means reproducing Python's canonical JSON, floats included.
    if (detail::sha256_bytes(text) != seal.substr(0, seal.find_first_of(" \t\n")))
      bad(path(kManifest) + " was modified after the build (it does not match " + kSeal + ")" + kIntact);
    std::string sig;
    is_signed = read_file(path(kSignature), &sig);
    if (public_key.empty()) return manifest;
    std::string pem;
    if (!read_file(public_key, &pem)) bad("cannot read the public key " + public_key + ": " + std::strerror(errno));
    if (!is_signed)
      bad(dir + " is not signed (no " + kSignature + ") but a public key was given; "
          "sign it with `python -m pipeline package --sign KEY`");
    bool valid = false;
    try {
      valid = detail::ed25519_verify(pem, text, sig);
    } catch (const detail::CannotCheckSignature& e) {
      unavailable(e.what());
    } catch (const std::invalid_argument& e) {
      bad("cannot read the public key " + public_key + " (" + e.what() + "); give an Ed25519 public key in PEM");
    }
    if (!valid)
      bad(dir + "/" + kSignature + " is not a signature of its manifest by " + public_key +
          ": the bundle was changed, or signed with another key");
    signature_checked = true;
    return manifest;
  }

  // Every file is one the manifest lists, with its sha256, and the files a run needs are there.
  void verify_files(const Json& manifest) {
    std::vector<std::pair<std::string, std::string>> expected;  // the build's files, then those package added
    auto listed_in = [&](const Json* files) {
      if (files && files->is(Json::Type::kObject))
        for (const auto& f : files->object()) expected.emplace_back(f.first, f.second.string());
    };
    listed_in(manifest.find("files"));
    if (const Json* bundle = manifest.find("bundle")) listed_in(bundle->find("files"));
    std::vector<std::string> problems, names;
    struct stat st;
    for (const char* f : kRunFiles)
      if (stat(path(f).c_str(), &st) != 0) problems.push_back(std::string(f) + " is missing");
    DIR* d = opendir(dir.c_str());
    if (!d) bad("cannot read the directory " + dir + ": " + std::strerror(errno));
    while (dirent* e = readdir(d))
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) names.push_back(e->d_name);
    closedir(d);
    std::sort(names.begin(), names.end());
    for (const auto& file : names) {
      if (lstat(path(file).c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
        problems.push_back(file + " is not a regular file");
        continue;
      }
      if (std::find(std::begin(kUnlisted), std::end(kUnlisted), file) != std::end(kUnlisted)) continue;
      auto listed = std::find_if(expected.begin(), expected.end(), [&](const auto& f) { return f.first == file; });
      std::string hex;
      if (listed == expected.end()) problems.push_back(file + " is not listed in the manifest");
      else if (!detail::sha256_file(path(file), &hex) || hex != listed->second)
        problems.push_back(file + " does not match its sha256 in the manifest (modified or corrupted)");
    }
    if (problems.empty()) return;
    std::string message = dir + " fails its manifest check: ";
    for (size_t i = 0; i < problems.size(); ++i) message += (i ? "; " : "") + problems[i];
    bad(message + kIntact);
  }

  Value alloc(const std::vector<int64_t>& shape, DLDataType dtype) {
    Tvm& tvm = Tvm::get();
    std::vector<TVMFFIAny> dims;
    for (int64_t d : shape) dims.push_back(detail::arg_int(d));
    Value shape_obj = tvm.call(tvm.global("ffi.Shape"), dims.data(), static_cast<int32_t>(dims.size()), "ffi.Shape");
    return tvm.call(tvm.global("runtime.TVMTensorAllocWithScope"),
                    {shape_obj.view(), detail::arg_dtype(dtype), detail::arg_device(device), detail::arg_none()},
                    "allocating a tensor");
  }

  void copy_in(const Value& tensor, const void* data, size_t nbytes) {
    Tvm::get().call(copy_from, {tensor.view(), detail::arg_ptr(data), detail::arg_int(static_cast<int64_t>(nbytes))},
                    "copying to the device");
  }

  // Load the library into a Relax VM on the manifest's device; its weights from params.npz, in the manifest's order.
  void load(const Json& manifest) {
    std::string lib = path(kLibrary), built_for = elf_arch(lib);
    if (!built_for.empty() && built_for != kArch)
      unavailable(lib + " is an " + built_for + " library and this machine is " + kArch +
                  "; run it on the board it was compiled for, or compile for this machine");
    Tvm* tvm;
    try {
      tvm = &Tvm::get();
      device = tvm->device(device_name);
    } catch (const detail::Unavailable& e) {
      unavailable(e.what());
    }
    try {
      Value get = tvm->global("ffi.ModuleGetFunction");
      auto function = [&](const Value& module, const char* fname) {
        Value f = tvm->call(get, {module.view(), detail::arg_str(fname), detail::arg_bool(true)}, fname);
        if (f.type() != kTVMFFIFunction)
          throw detail::TvmError(lib + " has no function " + fname + " (not a Relax VM library?)");
        return f;
      };
      try {
        library = tvm->call(tvm->global("ffi.ModuleLoadFromFile"), {detail::arg_str(lib.c_str())}, "loading");
      } catch (const detail::TvmError& e) {
        std::string reason = e.what();
        unavailable("cannot load " + lib + " here (" + reason.substr(reason.rfind('\n') + 1) +
                    "); was it compiled for this machine?");
      }
      vm = tvm->call(function(library, "vm_load_executable"), {}, "vm_load_executable");
      // The device and its pooled allocator (2), then the CPU for shape computations, as tvm.runtime.vm does.
      std::vector<TVMFFIAny> init = {detail::arg_int(device.device_type), detail::arg_int(device.device_id),
                                     detail::arg_int(2)};
      if (device.device_type != kDLCPU)
        for (int v : {int(kDLCPU), 0, 2}) init.push_back(detail::arg_int(v));
      tvm->call(function(vm, "vm_initialization"), init.data(), static_cast<int32_t>(init.size()), "vm_initialization");
      main = function(vm, "main");
      copy_from = tvm->global("runtime.TVMTensorCopyFromBytes");
      copy_to = tvm->global("runtime.TVMTensorCopyToBytes");
      num_threads = tvm->global("runtime.NumThreads");
      if (device.device_type != kDLCPU) sync = tvm->global("runtime.Device_StreamSync");
      for (const TensorSpec& spec : inputs) tensors.push_back(alloc(spec.shape, parse_dtype(spec.dtype)));
      NpzFile params(path("params.npz"));
      for (const Json& name : manifest.at("params").array()) {
        const NpyArray* a = params.find(name.string());
        if (!a) bad(path("params.npz") + " has no array " + name.string() + ", which the manifest lists");
        tensors.push_back(alloc(a->shape, parse_dtype(a->dtype)));
        copy_in(tensors.back(), a->data, a->nbytes);
      }
    } catch (const Error&) {
      throw;
    } catch (const detail::TvmError& e) {
      unavailable(e.what());
    } catch (const std::runtime_error& e) {
      bad(e.what());  // an unreadable params.npz
    }
    for (const Value& t : tensors) args.push_back(t.view());
  }

  size_t index(const std::vector<TensorSpec>& specs, const std::string& name, const char* what) const {
    for (size_t i = 0; i < specs.size(); ++i)
      if (specs[i].name == name) return i;
    std::string known;
    for (const auto& s : specs) known += (known.empty() ? "" : ", ") + s.name;
    bad("the model has no " + std::string(what) + " " + name + " (its " + what + "s: " + known + ")");
  }

  DLTensor* output_tensor(size_t i) const { return TVMFFITensorGetDLTensorPtr(results[i].v_obj); }
};

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
Model::~Model() = default;

Model Model::open(const std::string& directory, const Options& options) {
  auto impl = std::make_unique<Impl>();
  impl->dir = directory;
  while (impl->dir.size() > 1 && impl->dir.back() == '/') impl->dir.pop_back();
  Json manifest = impl->read_manifest(options.public_key);
  try {
    impl->verify_files(manifest);  // before anything is loaded
    const Json& target = manifest.at("target");
    impl->name = manifest.at("model").at("name").string();
    impl->target = target.at("name").string();
    impl->device_name = target.at("device").string();
    impl->build_id = manifest.at("build_id").string();
    impl->inputs = tensor_specs(manifest.at("inputs"));
    impl->outputs = tensor_specs(manifest.at("outputs"));
    impl->atol = manifest.at("tolerance").at("atol").number();
    impl->rtol = manifest.at("tolerance").at("rtol").number();
    int cores = target_cores(target);
    if (options.threads > 0) setenv("TVM_NUM_THREADS", std::to_string(options.threads).c_str(), 1);
    else if (cores > 0) setenv("TVM_NUM_THREADS", std::to_string(cores).c_str(), 0);  // TVM_NUM_THREADS wins
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    bad(impl->path(kManifest) + " is not a pipeline manifest (" + e.what() + ")");
  }
  impl->load(manifest);
  return Model(std::move(impl));
}

const std::string& Model::name() const { return impl_->name; }
const std::string& Model::target() const { return impl_->target; }
const std::string& Model::build_id() const { return impl_->build_id; }
const std::string& Model::device() const { return impl_->device_name; }
bool Model::is_signed() const { return impl_->is_signed; }
bool Model::signature_checked() const { return impl_->signature_checked; }
const std::vector<TensorSpec>& Model::inputs() const { return impl_->inputs; }
const std::vector<TensorSpec>& Model::outputs() const { return impl_->outputs; }

int Model::threads() const { return static_cast<int>(Tvm::get().call(impl_->num_threads, {}).integer()); }

void Model::set_input(const std::string& name, const void* data, size_t nbytes) {
  size_t i = impl_->index(impl_->inputs, name, "input");
  if (nbytes != impl_->inputs[i].nbytes())
    bad("input " + name + " takes " + std::to_string(impl_->inputs[i].nbytes()) + " bytes, not " +
        std::to_string(nbytes));
  try {
    impl_->copy_in(impl_->tensors[i], data, nbytes);
  } catch (const detail::TvmError& e) {
    unavailable(e.what());
  }
}

void Model::run() {
  Impl& m = *impl_;
  try {
    Tvm& tvm = Tvm::get();
    m.result = tvm.call(m.main, m.args.data(), static_cast<int32_t>(m.args.size()), "running main");
    m.results.clear();
    if (m.result.type() == kTVMFFITensor) m.results.push_back(m.result.view());
    else if (m.result.type() == kTVMFFIArray)
      for (int64_t i = 0; i < m.result.size(); ++i) m.results.push_back(m.result.item(i));
    if (m.sync.type() == kTVMFFIFunction) tvm.call(m.sync, {detail::arg_device(m.device), detail::arg_int(0)}, "sync");
  } catch (const detail::TvmError& e) {
    unavailable(e.what());
  }
  m.ran = m.results.size() == m.outputs.size() &&
          std::all_of(m.results.begin(), m.results.end(),
                      [](const TVMFFIAny& r) { return r.type_index == kTVMFFITensor; });
  if (!m.ran)
    bad(m.path(kLibrary) + "'s main returned " + std::to_string(m.results.size()) + " tensor(s); the manifest lists " +
        std::to_string(m.outputs.size()) + " outputs");
}

void Model::get_output(const std::string& name, void* data, size_t nbytes) const {
  const Impl& m = *impl_;
  size_t i = m.index(m.outputs, name, "output");
  if (!m.ran) bad("get_output(" + name + ") before run()");
  const DLTensor* t = m.output_tensor(i);
  size_t size = t->dtype.bits / 8;
  for (int d = 0; d < t->ndim; ++d) size *= static_cast<size_t>(t->shape[d]);
  if (nbytes != size) bad("output " + name + " has " + std::to_string(size) + " bytes, not " + std::to_string(nbytes));
  try {
    Tvm::get().call(m.copy_to, {m.results[i], detail::arg_ptr(data), detail::arg_int(static_cast<int64_t>(nbytes))},
                    "copying from the device");
  } catch (const detail::TvmError& e) {
    unavailable(e.what());
  }
}

void Model::set_reference_inputs() {
  try {
    NpzFile reference(impl_->path("inputs.npz"));
    for (const TensorSpec& spec : impl_->inputs) {
      const NpyArray* a = reference.find(spec.name);
      if (!a || a->shape != spec.shape || a->dtype != spec.dtype)
        bad(impl_->path("inputs.npz") + ": input " + spec.name + " is missing or not " + spec.dtype +
            " of the manifest's shape");
      set_input(spec.name, a->data, a->nbytes);
    }
  } catch (const Error&) {
    throw;
  } catch (const std::runtime_error& e) {
    bad(e.what());
  }
}

std::vector<OutputCheck> Model::check_outputs(bool throw_on_failure) const {
  const Impl& m = *impl_;
  std::vector<OutputCheck> checks;
  try {
    NpzFile reference(m.path("outputs.npz"));
    for (const TensorSpec& spec : m.outputs) {
      const NpyArray* expected = reference.find(spec.name);
      if (!expected) bad(m.path("outputs.npz") + " has no output " + spec.name);
      OutputCheck c{spec.name, INFINITY, INFINITY, m.atol, m.rtol, false};
      const DLTensor* t = m.ran ? m.output_tensor(m.index(m.outputs, spec.name, "output")) : nullptr;
      if (t && std::vector<int64_t>(t->shape, t->shape + t->ndim) == expected->shape) {
        size_t count = 1;
        for (int64_t d : expected->shape) count *= static_cast<size_t>(d);
        std::vector<uint8_t> bytes(count * (t->dtype.bits / 8));
        get_output(spec.name, bytes.data(), bytes.size());
        std::vector<double> a = to_doubles(bytes.data(), count, t->dtype);
        std::vector<double> b = to_doubles(expected->data, count, parse_dtype(expected->dtype));
        bool finite = true, within = true;
        c.max_abs = c.allclose = 0;
        for (size_t i = 0; i < count; ++i) {
          double diff = std::fabs(a[i] - b[i]), bound = m.atol + m.rtol * std::fabs(b[i]);
          within = within && diff <= bound;  // false for NaN, as in numpy
          finite = finite && std::isfinite(a[i]);
          c.max_abs = std::isnan(diff) || std::isnan(c.max_abs) ? NAN : std::max(c.max_abs, diff);
          c.allclose = std::max(c.allclose, diff / bound);
        }
        c.passed = within && finite;
        if (!finite) c.allclose = INFINITY;
      }
      checks.push_back(c);
    }
  } catch (const Error&) {
    throw;
  } catch (const std::runtime_error& e) {
    bad(e.what());
  }
  std::string failures;
  for (const auto& c : checks)
    if (!c.passed) failures += (failures.empty() ? "" : "; ") + c.describe();
  if (throw_on_failure && !failures.empty())
    throw Error(ErrorKind::kOutputsDiffer, "outputs differ from the reference: " + failures);
  return checks;
}

}  // namespace pipeline
