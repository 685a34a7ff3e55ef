#include "perf/transport_choice.h"

#ifdef ZIPWIRE_HAVE_VERBS
#include <infiniband/verbs.h>
#endif

#include <string>

namespace zipwire::perf {
namespace {

// "rxe0 port 1" for the first ACTIVE port, or empty; `seen` lists what exists.
std::string FindActivePort(const std::string& device, std::string* seen) {
#ifdef ZIPWIRE_HAVE_VERBS
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr) return "";
  std::string found;
  for (int i = 0; i < n && found.empty(); ++i) {
    const std::string name = ibv_get_device_name(list[i]);
    if (!device.empty() && name != device) continue;
    if (!seen->empty()) *seen += ", ";
    *seen += name;
    ibv_context* ctx = ibv_open_device(list[i]);
    if (ctx == nullptr) {
      *seen += " (cannot open)";
      continue;
    }
    ibv_device_attr attr{};
    if (ibv_query_device(ctx, &attr) == 0) {
      for (int port = 1; port <= attr.phys_port_cnt; ++port) {
        ibv_port_attr pa{};
        if (ibv_query_port(ctx, static_cast<uint8_t>(port), &pa) == 0 && pa.state == IBV_PORT_ACTIVE) {
          found = name + " port " + std::to_string(port);
          break;
        }
      }
    }
    if (found.empty()) *seen += " (no ACTIVE port)";
    ibv_close_device(ctx);
  }
  ibv_free_device_list(list);
  return found;
#else
  (void)device;
  *seen = "verbs backend not built";
  return "";
#endif
}

}  // namespace

TransportChoice ChooseTransport(const std::string& device) {
  std::string seen;
  std::string active = FindActivePort(device, &seen);
  if (!active.empty()) return {"verbs", active + " is ACTIVE"};
  std::string why =
      device.empty() ? "no ibverbs device with an ACTIVE port" : "device " + device + " has no ACTIVE port";
  why += seen.empty() ? " (libibverbs lists none)" : " (" + seen + ")";
#ifdef ZIPWIRE_HAVE_UCX
  return {"ucx", why + "; ucx is built"};
#else
  return {"tcp", why + "; ucx not built"};
#endif
}

}  // namespace zipwire::perf
