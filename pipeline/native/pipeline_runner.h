// pipeline_runner.h: run a pipeline artifact or bundle from C++, with no Python on the machine.
//
//   pipeline::Model model = pipeline::Model::open("cyclemlp_b1-jetson-orin-nano");  // checks, then loads
//   model.set_input("input", pixels.data(), pixels.size() * sizeof(float));
//   model.run();
//   std::vector<float> logits(10);
//   model.get_output("logits", logits.data(), logits.size() * sizeof(float));
//
// Model::open checks the directory as run.py does before anything is loaded: manifest.json against its seal
// manifest.sha256, its signature manifest.sig when a public key is given, and every file against its sha256 in the
// manifest. Then it opens the TVM runtime (libtvm_runtime.so and libtvm_ffi.so: from the directories of
// $TVM_LIBRARY_PATH, else the dynamic loader's path), the library lib.so on the manifest's device, and the weights
// params.npz. Every failure is a pipeline::Error whose exit_code() is the one run.py exits with.
//
// Build: compile pipeline_runner.cc with your program (C++17), with tvm-ffi's include directory on the include
// path (tvm/ffi/c_api.h, dlpack/dlpack.h), and link -ldl: TVM itself is opened at run time. CMakeLists.txt does it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace pipeline {

// What went wrong, as the exit status of run.py and the runner.
enum class ErrorKind : int {
  kUnavailable = 1,    // this machine cannot run it: no TVM runtime, no device or device support, another CPU
  kBadInput = 2,       // a bundle that is tampered, incomplete or unreadable; a wrong name or size from the caller
  kOutputsDiffer = 3,  // outputs differ from the reference (Model::check_outputs with throw_on_failure)
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }
  int exit_code() const { return static_cast<int>(kind_); }

 private:
  ErrorKind kind_;
};

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;  // numpy's name: float32, float16, int64, ...
  size_t nbytes() const;
};

struct Options {
  // An Ed25519 public key (PEM file): open() refuses the bundle unless manifest.sig is its signature. Needs OpenSSL's
  // libcrypto on the machine. Empty: a signature, if any, is not checked.
  std::string public_key;
  // CPU threads of TVM's pool; 0: $TVM_NUM_THREADS if set, else the cores the library was compiled for. TVM reads it
  // once per process, at its first parallel run.
  int threads = 0;
};

// One output compared with its reference: the allclose rule |actual - expected| <= atol + rtol |expected|
// everywhere, and all finite (run.py's, pipeline.runtime.compare).
struct OutputCheck {
  std::string name;
  double max_abs = 0;
  double allclose = 0;  // max |a - b| / (atol + rtol |b|); passing is <= 1
  double atol = 0, rtol = 0;
  bool passed = false;
  std::string describe() const;  // the line run.py prints for it
};

// One loaded model. Not thread-safe: use a Model from one thread at a time (TVM's thread pool already spreads
// each run over the cores).
class Model {
 public:
  // Check ``directory`` (an extracted bundle or an artifact directory), then load it; pipeline::Error otherwise.
  static Model open(const std::string& directory, const Options& options = Options());
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  ~Model();

  const std::string& name() const;      // the model, e.g. cyclemlp_b1
  const std::string& target() const;    // the target it was compiled for, e.g. jetson-orin-nano
  const std::string& build_id() const;  // sha256 of what was built (the manifest's build_id)
  const std::string& device() const;    // cpu or cuda
  bool is_signed() const;          // the directory has a manifest.sig
  bool signature_checked() const;  // ... and open() checked it against Options::public_key
  const std::vector<TensorSpec>& inputs() const;
  const std::vector<TensorSpec>& outputs() const;
  int threads() const;  // the size of TVM's CPU thread pool (known once the model has run)

  // Copy ``nbytes`` bytes (the input's dtype, C order) into the input ``name``; kBadInput for a wrong name or size.
  void set_input(const std::string& name, const void* data, size_t nbytes);
  // Run the model once on the inputs set; returns when the outputs are ready (also on a GPU).
  void run();
  // Copy the output ``name`` of the last run() into ``data`` (``nbytes`` must be its size).
  void get_output(const std::string& name, void* data, size_t nbytes) const;

  // The bundle's own check: set the reference inputs (inputs.npz), ...
  void set_reference_inputs();
  // ... and compare the last run's outputs with the reference (outputs.npz) at the manifest's tolerance. With
  // ``throw_on_failure``, an Error kOutputsDiffer naming every failing output instead of returning.
  std::vector<OutputCheck> check_outputs(bool throw_on_failure = false) const;

 private:
  struct Impl;
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pipeline
