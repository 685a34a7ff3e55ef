// Multi-process push_pull: a scheduler (in this process), servers and two
// workers as separate processes over loopback.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "transport/bootstrap.h"

namespace zipwire {
namespace {

struct Proc {
  pid_t pid = -1;
  int status = -1;
};

pid_t Spawn(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = fork();
  if (pid == 0) {
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

// Waits for every process, killing all after `limit` (a hang is a failure).
std::vector<int> WaitAll(const std::vector<pid_t>& pids, std::chrono::seconds limit) {
  std::vector<int> codes(pids.size(), -1);
  std::vector<bool> done(pids.size(), false);
  auto deadline = std::chrono::steady_clock::now() + limit;
  size_t left = pids.size();
  while (left > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int st = 0;
      if (waitpid(pids[i], &st, WNOHANG) == pids[i]) {
        done[i] = true;
        --left;
        codes[i] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      }
    }
    if (std::chrono::steady_clock::now() > deadline) {
      for (size_t i = 0; i < pids.size(); ++i) {
        if (!done[i]) {
          kill(pids[i], SIGKILL);
          waitpid(pids[i], nullptr, 0);
          codes[i] = -2;  // hung
        }
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return codes;
}

struct Cluster {
  std::vector<int> server_codes;
  std::vector<int> worker_codes;
};

Cluster RunCluster(uint32_t servers, const std::string& scenario, const std::string& codec) {
  setenv("ZIPWIRE_PARTITION_BYTES", "512k", 1);
  auto sched = transport::Scheduler::Start("127.0.0.1", 0, 2, servers);
  EXPECT_TRUE(sched.ok()) << sched.status().ToString();
  if (!sched.ok()) return {};
  std::string address = "127.0.0.1:" + std::to_string((*sched)->port());
  std::vector<pid_t> pids;
  for (uint32_t s = 0; s < servers; ++s) pids.push_back(Spawn({ZIPWIRE_TEST_NODE, "server", address}));
  for (int w = 0; w < 2; ++w) pids.push_back(Spawn({ZIPWIRE_TEST_NODE, "worker", address, scenario, codec}));
  std::vector<int> codes = WaitAll(pids, std::chrono::seconds(120));
  (*sched)->Stop();
  Cluster c;
  c.server_codes.assign(codes.begin(), codes.begin() + servers);
  c.worker_codes.assign(codes.begin() + servers, codes.end());
  return c;
}

TEST(PushPull, NoneCodecAggregateIsExactMean) {
  Cluster c = RunCluster(1, "exact", "none");
  EXPECT_EQ(c.server_codes, std::vector<int>({0}));
  EXPECT_EQ(c.worker_codes, std::vector<int>({0, 0}));
}

TEST(PushPull, ChunksSpreadOverTwoServersStayExact) {
  Cluster c = RunCluster(2, "exact", "none");
  EXPECT_EQ(c.server_codes, std::vector<int>({0, 0}));
  EXPECT_EQ(c.worker_codes, std::vector<int>({0, 0}));
}

TEST(PushPull, OnebitAggregateWithinCodecBound) {
  Cluster c = RunCluster(1, "bound", "onebit");
  EXPECT_EQ(c.server_codes, std::vector<int>({0}));
  EXPECT_EQ(c.worker_codes, std::vector<int>({0, 0}));
}

TEST(PushPull, OnebitWithErrorFeedbackRunsToCompletion) {
  Cluster c = RunCluster(1, "none_check", "onebit");
  EXPECT_EQ(c.server_codes, std::vector<int>({0}));
  EXPECT_EQ(c.worker_codes, std::vector<int>({0, 0}));
}

#ifdef ZIPWIRE_HAVE_UCX
// Over ucx on one host the servers' slots and the workers' receive buffers
// are memory the backend allocated (shared memory), so the chunks and the
// aggregates travel as direct writes (transport/ucx_backend.cc), not through
// UCX's data path; the result must be as exact as over tcp.
TEST(PushPull, UcxSharedMemoryAggregateIsExactMean) {
  setenv("ZIPWIRE_TRANSPORT", "ucx", 1);
  setenv("UCX_TLS", "posix,sysv,cma,self", 1);
  setenv("UCX_NET_DEVICES", "lo", 0);
  Cluster c = RunCluster(2, "exact", "none");
  unsetenv("ZIPWIRE_TRANSPORT");
  unsetenv("UCX_TLS");
  EXPECT_EQ(c.server_codes, std::vector<int>({0, 0}));
  EXPECT_EQ(c.worker_codes, std::vector<int>({0, 0}));
}
#endif

TEST(PushPull, WorkerDyingMidRunFailsTheOthersWithAStatusNotAHang) {
  Cluster c = RunCluster(1, "die_after_declare", "none");
  // Worker 1 died on purpose; the server reports the dead worker and exits
  // with an error; worker 0's pending push_pull fails with a status (exit 3)
  // instead of hanging (-2).
  // Ranks follow registration order, not spawn order: sort the codes.
  ASSERT_EQ(c.worker_codes.size(), 2u);
  std::sort(c.worker_codes.begin(), c.worker_codes.end());
  EXPECT_EQ(c.worker_codes, std::vector<int>({3, 9}));
  EXPECT_EQ(c.server_codes, std::vector<int>({1}));
}

}  // namespace
}  // namespace zipwire
