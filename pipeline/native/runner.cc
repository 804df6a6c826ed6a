// runner: a bundle's run.py without Python. Checks the bundle, runs the model on the reference inputs, compares
// every output with the reference at the manifest's tolerance, and times it; the same lines and exit codes as run.py.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "pipeline_runner.h"

namespace {

const char* kUsage = "usage: runner [BUNDLE_DIR] [--repeat N] [--warmup N] [--public-key PEM] [--help]\n";

const char* kHelp =
    "\n"
    "Check a pipeline bundle, run its model with the reference inputs, compare every output with the reference\n"
    "outputs at the manifest's tolerance, and print the median and p90 latency: what run.py does, without Python.\n"
    "\n"
    "  BUNDLE_DIR        an extracted bundle or an artifact directory (default: the runner's own directory)\n"
    "  --repeat N        timed runs (default 50)\n"
    "  --warmup N        untimed runs before timing (default 3)\n"
    "  --public-key PEM  refuse the bundle unless manifest.sig is its signature by this Ed25519 key\n"
    "                    (checked with the machine's OpenSSL libcrypto; without one, exit 1)\n"
    "  -h, --help        this text\n"
    "\n"
    "Before loading anything it checks manifest.json against manifest.sha256 and every file against its sha256\n"
    "in the manifest (a file that is modified, missing or not listed is refused). It does not recompute the\n"
    "build_id (run.py does); the seal covers the same bytes.\n"
    "\n"
    "Environment:\n"
    "  TVM_LIBRARY_PATH  directories (':'-separated) holding libtvm_runtime.so and libtvm_ffi.so (and, for a CUDA\n"
    "                    bundle, libtvm_runtime_cuda.so); searched first, then the dynamic loader's path\n"
    "  TVM_NUM_THREADS   CPU threads (default: the cores the library was compiled for)\n"
    "\n"
    "Exit status: 0 ok, 1 this machine cannot run it, 2 bad or tampered bundle (or bad arguments),\n"
    "3 outputs differ.\n";

int usage_error(const std::string& message) {
  std::fprintf(stderr, "%srunner: error: %s\n", kUsage, message.c_str());
  return 2;
}

bool parse_count(const char* text, long minimum, long* out) {
  char* end = nullptr;
  long v = std::strtol(text, &end, 10);
  if (!*text || *end || v < minimum) return false;
  *out = v;
  return true;
}

// numpy.percentile's default (linear between the closest ranks) of sorted values.
double percentile(const std::vector<double>& sorted, double q) {
  double rank = q / 100.0 * static_cast<double>(sorted.size() - 1);
  size_t low = static_cast<size_t>(rank), high = std::min(low + 1, sorted.size() - 1);
  return sorted[low] + (sorted[high] - sorted[low]) * (rank - static_cast<double>(low));
}

// The directory of this executable: a bundle's runner checks its own bundle by default.
std::string own_directory() {
  std::vector<char> path(4096);
  ssize_t n = readlink("/proc/self/exe", path.data(), path.size() - 1);
  std::string self = n > 0 ? std::string(path.data(), static_cast<size_t>(n)) : ".";
  size_t slash = self.rfind('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : self.substr(0, slash);
}

}  // namespace

int main(int argc, char** argv) {
  auto start = std::chrono::steady_clock::now();
  std::string directory;
  long repeat = 50, warmup = 3;
  pipeline::Options options;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    bool has_value = i + 1 < argc;
    if (arg == "-h" || arg == "--help") {
      std::printf("%s%s", kUsage, kHelp);
      return 0;
    } else if (arg == "--repeat" || arg == "--warmup") {
      long* target = arg == "--repeat" ? &repeat : &warmup;
      if (!has_value || !parse_count(argv[++i], arg == "--repeat" ? 1 : 0, target))
        return usage_error(arg == "--repeat" ? "--repeat must be >= 1" : "--warmup must be >= 0");
    } else if (arg == "--public-key") {
      if (!has_value) return usage_error("--public-key needs a PEM file");
      options.public_key = argv[++i];
    } else if (!arg.empty() && arg[0] == '-') {
      return usage_error("unrecognized argument " + arg);
    } else if (directory.empty()) {
      directory = arg;
    } else {
      return usage_error("one bundle directory only (extract a bundle file with tar xf first)");
    }
  }
  if (directory.empty()) directory = own_directory();
  try {
    pipeline::Model model = pipeline::Model::open(directory, options);
    model.set_reference_inputs();
    model.run();
    std::vector<pipeline::OutputCheck> checks = model.check_outputs(/*throw_on_failure=*/true);
    for (long i = 0; i < warmup; ++i) model.run();
    std::vector<double> ms;
    for (long i = 0; i < repeat; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      model.run();
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    const char* signature = model.signature_checked() ? "signature checked"
                            : model.is_signed()       ? "signed, signature not checked (no --public-key)"
                                                      : "not signed";
    std::printf("%s for %s (build %s): manifest intact, files match the manifest, %s\n", model.name().c_str(),
                model.target().c_str(), model.build_id().substr(0, 16).c_str(), signature);
    for (const auto& check : checks) std::printf("%s\n", check.describe().c_str());
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("latency: median %.3f ms, p90 %.3f ms over %ld runs after %ld warm-up, on %s, %d CPU thread(s) "
                "(%.1f s in all)\n", percentile(ms, 50), percentile(ms, 90), repeat, warmup, model.device().c_str(),
                model.threads(), seconds);
  } catch (const pipeline::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return e.exit_code();
  } catch (const std::exception& e) {  // not expected: the API reports its failures as pipeline::Error
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
