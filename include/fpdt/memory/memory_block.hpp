//! \file
//! \brief `memory_block<Owner>`: move-only handle to memory that returns itself to its owner.
#pragma once

#include "../config.hpp"

#include <cstddef>
#include <utility>

FPDT_NAMESPACE_BEGIN

//! Move-only ownership of `size_bytes()` bytes at `data()`, handed back to `Owner` on destruction.
//!
//! `Owner` (a `device_arena` or a `pinned_pool`) must outlive the block. `data()` is null for an
//! empty block and for blocks of an arena in count-only mode (sizes are counted, nothing is
//! allocated). `Owner` provides `void release_block(void* p, std::size_t capacity) noexcept`.
template <class Owner> class memory_block {
public:
  //! An empty block (owns nothing).
  memory_block() noexcept = default;
  //! Takes ownership of `capacity` bytes at `p` (of which `bytes` were asked for) from `owner`.
  memory_block(Owner* owner, void* p, std::size_t bytes, std::size_t capacity) noexcept
      : owner_(owner), data_(p), bytes_(bytes), capacity_(capacity) {}
  memory_block(memory_block const&) = delete;
  memory_block& operator=(memory_block const&) = delete;
  //! Moves ownership; `other` becomes empty.
  memory_block(memory_block&& other) noexcept
      : owner_(std::exchange(other.owner_, nullptr)), data_(std::exchange(other.data_, nullptr)),
        bytes_(std::exchange(other.bytes_, 0)), capacity_(std::exchange(other.capacity_, 0)) {}
  //! Releases what this block holds, then takes ownership from `other`.
  memory_block& operator=(memory_block&& other) noexcept {
    if (this != &other) {
      reset();
      owner_ = std::exchange(other.owner_, nullptr);
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
      capacity_ = std::exchange(other.capacity_, 0);
    }
    return *this;
  }
  //! Returns the memory to its owner.
  ~memory_block() { reset(); }

  //! Returns the memory to its owner now; the block becomes empty.
  void reset() noexcept {
    if (owner_ != nullptr) owner_->release_block(data_, capacity_);
    owner_ = nullptr;
    data_ = nullptr;
    bytes_ = 0;
    capacity_ = 0;
  }

  //! First byte (null when empty or counted only).
  [[nodiscard]] void* data() const noexcept { return data_; }
  //! The memory as `T*` (the caller vouches for alignment and size).
  template <class T> [[nodiscard]] T* as() const noexcept { return static_cast<T*>(data_); }
  //! Bytes asked for.
  [[nodiscard]] std::size_t size_bytes() const noexcept { return bytes_; }
  //! Bytes actually reserved (asked-for bytes rounded up to the owner's granularity).
  [[nodiscard]] std::size_t capacity_bytes() const noexcept { return capacity_; }
  //! True when this block owns memory (or, in count-only mode, a counted reservation).
  [[nodiscard]] bool owns() const noexcept { return owner_ != nullptr; }

private:
  Owner* owner_ = nullptr;
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  std::size_t capacity_ = 0;
};

FPDT_NAMESPACE_END
