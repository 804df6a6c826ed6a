// example: an application of the C++ API (pipeline_runner.h). It opens a bundle (checked as the runner checks it),
// sets the model's input from a raw file (or the bundle's reference input), runs it once, prints the first output's
// largest values and can write that output as a raw file.
//
//   example BUNDLE_DIR [INPUT.bin [OUTPUT.bin]]
//
// INPUT.bin holds the input's bytes in its dtype and C order (numpy: x.astype("float32").tofile("INPUT.bin"));
// OUTPUT.bin receives the first output's (numpy: np.fromfile("OUTPUT.bin", "float32")). Exit codes as the runner's.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <numeric>
#include <string>
#include <vector>

#include "pipeline_runner.h"

int main(int argc, char** argv) {
  if (argc < 2 || argc > 4) {
    std::fprintf(stderr, "usage: example BUNDLE_DIR [INPUT.bin [OUTPUT.bin]]\n");
    return 2;
  }
  try {
    pipeline::Model model = pipeline::Model::open(argv[1]);
    const pipeline::TensorSpec& input = model.inputs().at(0);
    if (argc >= 3) {
      std::ifstream file(argv[2], std::ios::binary);
      std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
      if (!file.good() && !file.eof())
        throw pipeline::Error(pipeline::ErrorKind::kBadInput, std::string("cannot read ") + argv[2]);
      model.set_input(input.name, bytes.data(), bytes.size());  // a wrong size is an Error naming the right one
    } else {
      model.set_reference_inputs();
    }
    model.run();

    const pipeline::TensorSpec& output = model.outputs().at(0);
    std::vector<char> bytes(output.nbytes());
    model.get_output(output.name, bytes.data(), bytes.size());
    std::printf("%s %s: %s of %zu bytes\n", model.name().c_str(), model.target().c_str(), output.name.c_str(),
                bytes.size());
    if (output.dtype == "float32") {
      const float* values = reinterpret_cast<const float*>(bytes.data());
      std::vector<size_t> order(bytes.size() / sizeof(float));
      std::iota(order.begin(), order.end(), 0);
      size_t top = std::min<size_t>(5, order.size());
      std::partial_sort(order.begin(), order.begin() + top, order.end(),
                        [&](size_t a, size_t b) { return values[a] > values[b]; });
      for (size_t i = 0; i < top; ++i) std::printf("  #%zu: index %zu, %g\n", i + 1, order[i], values[order[i]]);
    }
    if (argc == 4) {
      std::ofstream out(argv[3], std::ios::binary);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      if (!out) throw pipeline::Error(pipeline::ErrorKind::kBadInput, std::string("cannot write ") + argv[3]);
    }
  } catch (const pipeline::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return e.exit_code();
  }
  return 0;
}
