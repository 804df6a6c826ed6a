// A JSON reader for the manifest: the whole grammar (RFC 8259), values kept as parsed, objects in file order.
// The manifest is written by Python's json module, so this needs no more than that; a parse error says where.
#pragma once

#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace pipeline {
namespace detail {

class Json {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  static Json parse(const std::string& text) {
    Parser p{text, 0};
    Json value = p.value();
    p.space();
    if (p.at < text.size()) p.fail("trailing characters");
    return value;
  }

  Type type() const { return type_; }
  bool is(Type t) const { return type_ == t; }
  bool boolean() const { return expect(Type::kBool).bool_; }
  double number() const { return expect(Type::kNumber).number_; }
  int64_t integer() const {
    double v = number();
    if (v != static_cast<double>(static_cast<int64_t>(v))) throw std::runtime_error("expected an integer");
    return static_cast<int64_t>(v);
  }
  const std::string& string() const { return expect(Type::kString).string_; }
  const std::vector<Json>& array() const { return expect(Type::kArray).array_; }
  const std::vector<std::pair<std::string, Json>>& object() const { return expect(Type::kObject).object_; }

  // The member ``key`` of an object, or nullptr (also when this is no object).
  const Json* find(const std::string& key) const {
    if (type_ != Type::kObject) return nullptr;
    for (const auto& member : object_)
      if (member.first == key) return &member.second;
    return nullptr;
  }
  // The member ``key``, which must be there.
  const Json& at(const std::string& key) const {
    const Json* v = find(key);
    if (!v) throw std::runtime_error("no \"" + key + "\"");
    return *v;
  }

 private:
  const Json& expect(Type t) const {
    static const char* names[] = {"null", "a boolean", "a number", "a string", "an array", "an object"};
    if (type_ != t) throw std::runtime_error(std::string("expected ") + names[int(t)] + ", found " + names[int(type_)]);
    return *this;
  }

  struct Parser {
    const std::string& s;
    size_t at;

    [[noreturn]] void fail(const std::string& what) {
      throw std::runtime_error("invalid JSON at byte " + std::to_string(at) + ": " + what);
    }
    void space() {
      while (at < s.size() && (s[at] == ' ' || s[at] == '\n' || s[at] == '\r' || s[at] == '\t')) ++at;
    }
    bool take(const char* word) {
      size_t n = std::char_traits<char>::length(word);
      if (s.compare(at, n, word) != 0) return false;
      at += n;
      return true;
    }
    Json value() {
      space();
      if (at >= s.size()) fail("unexpected end");
      Json v;
      char c = s[at];
      if (c == '{') {
        v.type_ = Type::kObject;
        ++at;
        space();
        if (at < s.size() && s[at] == '}') return ++at, v;
        do {
          space();
          if (at >= s.size() || s[at] != '"') fail("expected a key");
          std::string key = string();
          space();
          if (at >= s.size() || s[at] != ':') fail("expected ':'");
          ++at;
          v.object_.emplace_back(std::move(key), value());
        } while (more('}'));
        return v;
      }
      if (c == '[') {
        v.type_ = Type::kArray;
        ++at;
        space();
        if (at < s.size() && s[at] == ']') return ++at, v;
        do v.array_.push_back(value());
        while (more(']'));
        return v;
      }
      if (c == '"') return v.type_ = Type::kString, v.string_ = string(), v;
      if (take("true")) return v.type_ = Type::kBool, v.bool_ = true, v;
      if (take("false")) return v.type_ = Type::kBool, v.bool_ = false, v;
      if (take("null")) return v;
      // Python's json also writes NaN, Infinity and -Infinity.
      if (take("NaN")) return v.type_ = Type::kNumber, v.number_ = std::strtod("nan", nullptr), v;
      if (take("Infinity")) return v.type_ = Type::kNumber, v.number_ = HUGE_VAL, v;
      if (take("-Infinity")) return v.type_ = Type::kNumber, v.number_ = -HUGE_VAL, v;
      size_t start = at;
      if (s[at] == '-') ++at;
      while (at < s.size() && (std::isdigit(static_cast<unsigned char>(s[at])) || s[at] == '.' || s[at] == 'e' ||
                               s[at] == 'E' || s[at] == '+' || s[at] == '-'))
        ++at;
      std::string text = s.substr(start, at - start);
      char* end = nullptr;
      v.number_ = std::strtod(text.c_str(), &end);
      if (text.empty() || text == "-" || *end != '\0') { at = start; fail("expected a value"); }
      v.type_ = Type::kNumber;
      return v;
    }
    // After an item of an array or object: true at ',' (another follows), false at ``close`` (the end).
    bool more(char close) {
      space();
      if (at < s.size() && s[at] == ',') return ++at, true;
      if (at < s.size() && s[at] == close) return ++at, false;
      fail(std::string("expected ',' or '") + close + "'");
    }
    unsigned hex4() {
      if (at + 4 > s.size()) fail("short \\u escape");
      unsigned code = 0;
      for (int i = 0; i < 4; ++i) {
        char c = s[at++];
        code <<= 4;
        if (c >= '0' && c <= '9') code |= unsigned(c - '0');
        else if (c >= 'a' && c <= 'f') code |= unsigned(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') code |= unsigned(c - 'A' + 10);
        else fail("bad \\u escape");
      }
      return code;
    }
    std::string string() {
      ++at;  // the opening quote
      std::string out;
      while (at < s.size() && s[at] != '"') {
        char c = s[at++];
        if (c != '\\') { out += c; continue; }
        if (at >= s.size()) break;
        char e = s[at++];
        switch (e) {
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'n': out += '\n'; break;
          case 'r': out += '\r'; break;
          case 't': out += '\t'; break;
          case 'u': {
            unsigned code = hex4();
            if (code >= 0xD800 && code < 0xDC00 && take("\\u")) {  // a surrogate pair (ensure_ascii writes them)
              unsigned low = hex4();
              code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
            }
            utf8(code, &out);
            break;
          }
          default: fail("bad escape");
        }
      }
      if (at >= s.size()) fail("unterminated string");
      ++at;
      return out;
    }
    static void utf8(unsigned code, std::string* out) {
      if (code < 0x80) {
        *out += char(code);
      } else if (code < 0x800) {
        *out += char(0xC0 | (code >> 6)), *out += char(0x80 | (code & 0x3F));
      } else if (code < 0x10000) {
        *out += char(0xE0 | (code >> 12)), *out += char(0x80 | ((code >> 6) & 0x3F));
        *out += char(0x80 | (code & 0x3F));
      } else {
        *out += char(0xF0 | (code >> 18)), *out += char(0x80 | ((code >> 12) & 0x3F));
        *out += char(0x80 | ((code >> 6) & 0x3F)), *out += char(0x80 | (code & 0x3F));
      }
    }
  };

  Type type_ = Type::kNull;
  bool bool_ = false;
  double number_ = 0;
  std::string string_;
  std::vector<Json> array_;
  std::vector<std::pair<std::string, Json>> object_;
};

}  // namespace detail
}  // namespace pipeline
