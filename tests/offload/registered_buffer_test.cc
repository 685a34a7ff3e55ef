// RegisteredBuffer: backend memory where the backend offers it, else ours,
// registered either way, zeroed, and usable as a write target.
#include "offload/registered_buffer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>

namespace zipwire::offload {
namespace {

std::unique_ptr<transport::Backend> Make(const std::string& name) {
  if (name == "ucx") {
    setenv("UCX_TLS", "posix,sysv,cma,self", 1);
    setenv("UCX_NET_DEVICES", "lo", 0);
  }
  transport::BackendOptions opts;
  opts.self = 0;
  auto made = transport::CreateBackend(name, opts);
  EXPECT_TRUE(made.ok()) << made.status().ToString();
  return made.ok() ? std::move(made).value() : nullptr;
}

void ExpectZeroedAndRegistered(transport::Backend* backend, const RegisteredBuffer& buf, size_t bytes) {
  ASSERT_NE(buf.data(), nullptr);
  EXPECT_EQ(buf.size(), bytes);
  EXPECT_EQ(buf.region().addr, buf.data());
  EXPECT_EQ(buf.region().length, bytes);
  EXPECT_TRUE(std::all_of(buf.data(), buf.data() + bytes, [](uint8_t b) { return b == 0; }));
  buf.data()[bytes - 1] = 7;                                  // writable to the end
  EXPECT_TRUE(backend->DeregisterMemory(buf.region()).ok());  // a live registration
}

TEST(RegisteredBuffer, TcpHasNoAllocationSoTheBytesAreOurs) {
  auto backend = Make("tcp");
  ASSERT_TRUE(backend);
  ASSERT_FALSE(backend->capabilities().supports_alloc);
  auto buf = RegisteredBuffer::Create(backend.get(), 100000);
  ASSERT_TRUE(buf.ok()) << buf.status().ToString();
  EXPECT_FALSE(buf->backend_allocated());
  ExpectZeroedAndRegistered(backend.get(), *buf, 100000);
}

#ifdef ZIPWIRE_HAVE_UCX
TEST(RegisteredBuffer, UcxAllocatesSharedMemoryAndZeroesIt) {
  auto backend = Make("ucx");
  ASSERT_TRUE(backend);
  ASSERT_TRUE(backend->capabilities().supports_alloc);
  auto buf = RegisteredBuffer::Create(backend.get(), 1 << 20);
  ASSERT_TRUE(buf.ok()) << buf.status().ToString();
  EXPECT_TRUE(buf->backend_allocated());
  ExpectZeroedAndRegistered(backend.get(), *buf, 1 << 20);
}
#endif

TEST(RegisteredBuffer, ClosedBackendIsAnErrorNotACrash) {
  for (const char* name : {"tcp"
#ifdef ZIPWIRE_HAVE_UCX
                           ,
                           "ucx"
#endif
       }) {
    auto backend = Make(name);
    ASSERT_TRUE(backend);
    backend->Close();
    auto buf = RegisteredBuffer::Create(backend.get(), 4096);
    EXPECT_FALSE(buf.ok()) << name;
  }
}

}  // namespace
}  // namespace zipwire::offload
