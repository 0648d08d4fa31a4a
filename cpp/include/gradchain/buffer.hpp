// Scratch memory that a chain keeps between passes.
#pragma once

#include <cstddef>
#include <memory>

namespace gradchain {

// Uninitialised on growth: a pass writes before it reads, and zero-filling gigabytes first
// would double the cost.
template <class T>
class Buffer {
 public:
  T* get(std::size_t n) {
    if (n > cap_) {
      p_.reset();
      p_.reset(new T[n]);
      cap_ = n;
    }
    return p_.get();
  }
  void release() {
    p_.reset();
    cap_ = 0;
  }
  std::size_t capacity() const { return cap_; }
  double bytes() const { return double(cap_) * sizeof(T); }

 private:
  std::unique_ptr<T[]> p_;
  std::size_t cap_ = 0;
};

}  // namespace gradchain
