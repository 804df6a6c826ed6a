// Ed25519 signatures (manifest.sig, `pipeline package --sign`), checked with the machine's OpenSSL libcrypto
// (3.x, or 1.1.1), opened only when a public key is given: most images have it, and implementing the curve here
// would be a crypto library of our own. Without libcrypto the check cannot be made, and the runner says so.
#pragma once

#include <dlfcn.h>

#include <stdexcept>
#include <string>

namespace pipeline {
namespace detail {

// The signature could not be checked on this machine (no usable libcrypto).
struct CannotCheckSignature : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// True iff ``signature`` is ``key_pem``'s (an Ed25519 public key in PEM) signature of ``message``;
// std::invalid_argument when the key is not one.
inline bool ed25519_verify(const std::string& key_pem, const std::string& message, const std::string& signature) {
  void* crypto = nullptr;
  for (const char* name : {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so"})
    if ((crypto = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
  if (!crypto)
    throw CannotCheckSignature("checking a signature needs OpenSSL's libcrypto (libcrypto.so.3 or .so.1.1), "
                               "which this machine lacks; install it (Debian/Ubuntu: libssl3) or check the signature "
                               "elsewhere: openssl pkeyutl -verify -pubin -inkey KEY.pem -rawin -in manifest.json "
                               "-sigfile manifest.sig");
  auto sym = [&](const char* name) { return dlsym(crypto, name); };
  using NewBio = void* (*)(const void*, int);
  using ReadKey = void* (*)(void*, void**, void*, void*);
  using FreeBio = int (*)(void*);
  using KeyId = int (*)(const void*);
  using NewCtx = void* (*)();
  using VerifyInit = int (*)(void*, void**, const void*, void*, void*);
  using Verify = int (*)(void*, const unsigned char*, size_t, const unsigned char*, size_t);
  using FreeCtx = void (*)(void*);
  using FreeKey = void (*)(void*);
  auto new_bio = reinterpret_cast<NewBio>(sym("BIO_new_mem_buf"));
  auto read_key = reinterpret_cast<ReadKey>(sym("PEM_read_bio_PUBKEY"));
  auto free_bio = reinterpret_cast<FreeBio>(sym("BIO_free"));
  auto key_id = reinterpret_cast<KeyId>(sym("EVP_PKEY_get_id") ? sym("EVP_PKEY_get_id") : sym("EVP_PKEY_id"));
  auto new_ctx = reinterpret_cast<NewCtx>(sym("EVP_MD_CTX_new"));
  auto verify_init = reinterpret_cast<VerifyInit>(sym("EVP_DigestVerifyInit"));
  auto verify = reinterpret_cast<Verify>(sym("EVP_DigestVerify"));
  auto free_ctx = reinterpret_cast<FreeCtx>(sym("EVP_MD_CTX_free"));
  auto free_key = reinterpret_cast<FreeKey>(sym("EVP_PKEY_free"));
  if (!new_bio || !read_key || !free_bio || !key_id || !new_ctx || !verify_init || !verify || !free_ctx || !free_key)
    throw CannotCheckSignature("this machine's libcrypto has no Ed25519 verification (OpenSSL 1.1.1 or later needed)");
  const int kEd25519 = 1087;  // EVP_PKEY_ED25519 (NID_ED25519)
  void* bio = new_bio(key_pem.data(), static_cast<int>(key_pem.size()));
  void* key = bio ? read_key(bio, nullptr, nullptr, nullptr) : nullptr;
  if (bio) free_bio(bio);
  if (!key || key_id(key) != kEd25519) {
    if (key) free_key(key);
    throw std::invalid_argument("it is not an Ed25519 public key in PEM");
  }
  void* ctx = new_ctx();
  bool valid = ctx && verify_init(ctx, nullptr, nullptr, nullptr, key) == 1 &&
               verify(ctx, reinterpret_cast<const unsigned char*>(signature.data()), signature.size(),
                      reinterpret_cast<const unsigned char*>(message.data()), message.size()) == 1;
  if (ctx) free_ctx(ctx);
  free_key(key);
  return valid;
}

}  // namespace detail
}  // namespace pipeline
