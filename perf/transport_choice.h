// zipwire_perf -t auto: picks the fastest backend this host can run, as
// perftest users would by hand: verbs when an RDMA device has an ACTIVE port,
// else ucx when built, else tcp; and says why.
#pragma once

#include <string>

namespace zipwire::perf {

struct TransportChoice {
  std::string name;    // "verbs", "ucx" or "tcp"
  std::string reason;  // one line: what was found
};

// `device`: only this ibverbs device counts (zipwire_perf -d); empty: any.
TransportChoice ChooseTransport(const std::string& device);

}  // namespace zipwire::perf
