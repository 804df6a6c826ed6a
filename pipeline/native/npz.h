// The arrays of an .npz file: a zip archive of .npy files, each stored uncompressed, as `pipeline compile` writes
// params.npz, inputs.npz and outputs.npz (numpy.savez layout). Read from a read-only mapping of the file, so a
// weight is copied once, from the file to the device; a compressed member (numpy.savez_compressed) is refused.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace pipeline {
namespace detail {

struct NpyArray {
  std::string name;  // the member's name without ".npy"
  std::string dtype;  // as the manifest spells it: float32, float16, int64, ...
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // C order, little-endian, inside the mapping
  size_t nbytes = 0;
};

class NpzFile {
 public:
  explicit NpzFile(const std::string& path) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || ::fstat(fd, &st) != 0) {
      if (fd >= 0) ::close(fd);
      fail("cannot be opened: " + std::string(std::strerror(errno)));
    }
    size_ = static_cast<size_t>(st.st_size);
    void* map = size_ ? ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    ::close(fd);
    if (map == MAP_FAILED) fail("cannot be mapped (empty, or " + std::string(std::strerror(errno)) + ")");
    base_ = static_cast<const uint8_t*>(map);
    read_directory();
  }
  ~NpzFile() { if (base_) ::munmap(const_cast<uint8_t*>(base_), size_); }
  NpzFile(const NpzFile&) = delete;
  NpzFile& operator=(const NpzFile&) = delete;

  const std::vector<NpyArray>& arrays() const { return arrays_; }
  const NpyArray* find(const std::string& name) const {
    for (const auto& a : arrays_)
      if (a.name == name) return &a;
    return nullptr;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const { throw std::runtime_error(path_ + " " + why); }

  uint64_t u16(size_t at) const { need(at, 2); return uint64_t(base_[at]) | uint64_t(base_[at + 1]) << 8; }
  uint64_t u32(size_t at) const { return u16(at) | u16(at + 2) << 16; }
  uint64_t u64(size_t at) const { return u32(at) | u32(at + 4) << 32; }
  void need(uint64_t at, uint64_t n) const {
    if (at > size_ || n > size_ - at) fail("is not a complete zip archive (truncated?)");
  }

  void read_directory() {
    // End of central directory: the last record with its signature (a comment may follow it).
    if (size_ < 22) fail("is not a zip archive");
    size_t end = size_ - 22;
    while (u32(end) != 0x06054b50) {
      if (end == 0 || size_ - end > 22 + 0xFFFF) fail("is not a zip archive (no end record)");
      --end;
    }
    uint64_t count = u16(end + 10), offset = u32(end + 16);
    if ((count == 0xFFFF || offset == 0xFFFFFFFF) && end >= 20 && u32(end - 20) == 0x07064b50) {
      uint64_t zip64 = u64(end - 20 + 8);  // the zip64 end record, for archives past 4 GiB or 65535 members
      if (u32(zip64) != 0x06064b50) fail("has a broken zip64 end record");
      count = u64(zip64 + 32), offset = u64(zip64 + 48);
    }
    for (uint64_t i = 0; i < count; ++i) {
      if (u32(offset) != 0x02014b50) fail("has a broken central directory");
      uint64_t method = u16(offset + 10), size = u32(offset + 20), local = u32(offset + 42);
      uint64_t name_len = u16(offset + 28), extra_len = u16(offset + 30), comment_len = u16(offset + 32);
      need(offset + 46, name_len + extra_len);
      std::string name(reinterpret_cast<const char*>(base_ + offset + 46), name_len);
      // zip64 extra field: the 64-bit values of whichever of size, original size and offset are 0xFFFFFFFF.
      for (uint64_t x = offset + 46 + name_len, x_end = x + extra_len; x + 4 <= x_end;) {
        uint64_t id = u16(x), len = u16(x + 2), field = x + 4;
        if (id == 0x0001) {
          if (u32(offset + 24) == 0xFFFFFFFF) field += 8;  // the uncompressed size comes first
          if (size == 0xFFFFFFFF) size = u64(field), field += 8;
          if (local == 0xFFFFFFFF) local = u64(field);
        }
        x += 4 + len;
      }
      if (method != 0)
        fail("member " + name + " is compressed (zip method " + std::to_string(method) +
             "); the runner reads uncompressed .npz files, as `pipeline compile` writes them");
      if (u32(local) != 0x04034b50) fail("has a broken local header for " + name);
      uint64_t data = local + 30 + u16(local + 26) + u16(local + 28);
      need(data, size);
      arrays_.push_back(parse_npy(name, base_ + data, size));
      offset += 46 + name_len + extra_len + comment_len;
    }
  }

  // One .npy: magic, version, header length, a Python dict literal ('descr', 'fortran_order', 'shape'), data.
  NpyArray parse_npy(const std::string& member, const uint8_t* p, uint64_t size) const {
    NpyArray a;
    a.name = member.size() > 4 && member.compare(member.size() - 4, 4, ".npy") == 0
                 ? member.substr(0, member.size() - 4) : member;
    if (size < 12 || std::memcmp(p, "\x93NUMPY", 6) != 0) fail("member " + member + " is not a .npy array");
    uint64_t header_len = uint64_t(p[8]) | uint64_t(p[9]) << 8;  // version 1: 2 bytes; 2 and 3: 4 bytes
    if (p[6] != 1) header_len |= uint64_t(p[10]) << 16 | uint64_t(p[11]) << 24;
    uint64_t start = p[6] == 1 ? 10 : 12;
    if (start + header_len > size) fail("member " + member + " has a truncated .npy header");
    std::string header(reinterpret_cast<const char*>(p + start), header_len);
    std::string descr = field(header, "descr", member);
    std::string order = field(header, "fortran_order", member);
    std::string shape = field(header, "shape", member);
    if (order.rfind("False", 0) != 0) fail("member " + member + " is in Fortran order; expected C order");
    static const std::pair<const char*, const char*> dtypes[] = {
        {"<f4", "float32"}, {"<f2", "float16"}, {"<f8", "float64"}, {"<i8", "int64"}, {"<i4", "int32"},
        {"<i2", "int16"},   {"|i1", "int8"},    {"|u1", "uint8"},   {"<u2", "uint16"}, {"<u4", "uint32"},
        {"<u8", "uint64"},  {"|b1", "bool"}};
    std::string quoted = descr.size() >= 2 ? descr.substr(1, descr.find(descr[0], 1) - 1) : "";
    for (const auto& d : dtypes)
      if (quoted == d.first) a.dtype = d.second;
    if (a.dtype.empty()) fail("member " + member + " has dtype " + descr + ", which the runner does not read");
    uint64_t count = 1;
    for (size_t i = shape.find('(') + 1; i < shape.size() && shape[i] != ')';) {
      if (std::isdigit(static_cast<unsigned char>(shape[i]))) {
        size_t used = 0;
        int64_t dim = std::stoll(shape.substr(i), &used);
        a.shape.push_back(dim);
        count *= static_cast<uint64_t>(dim);
        i += used;
      } else {
        ++i;
      }
    }
    a.nbytes = count * (quoted.back() - '0');
    if (start + header_len + a.nbytes > size) fail("member " + member + " is shorter than its shape says");
    a.data = p + start + header_len;
    return a;
  }

  // The text after 'key': in the header dict, up to the next top-level comma.
  std::string field(const std::string& header, const std::string& key, const std::string& member) const {
    size_t at = header.find("'" + key + "'");
    if (at == std::string::npos || (at = header.find(':', at)) == std::string::npos)
      fail("member " + member + " has no '" + key + "' in its .npy header");
    ++at;
    while (at < header.size() && header[at] == ' ') ++at;
    size_t end = header[at] == '(' ? header.find(')', at) + 1 : header.find(',', at);
    return header.substr(at, end == std::string::npos ? std::string::npos : end - at);
  }

  std::string path_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  std::vector<NpyArray> arrays_;
};

}  // namespace detail
}  // namespace pipeline
