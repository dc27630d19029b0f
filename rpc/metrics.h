// Prometheus metrics: the /metrics HTTP endpoint every muonps service serves
// (prometheus-cpp), and the gRPC server metrics every server records through
// an interceptor. Names follow Prometheus conventions: one `muonps_` prefix,
// base units (`_seconds`, `_bytes`), `_total` on counters, histograms for
// latencies, labels with bounded values only (never a job or task id).
#ifndef MUONPS_RPC_METRICS_H_
#define MUONPS_RPC_METRICS_H_

#include <grpcpp/support/server_interceptor.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace muonps {

// Serves `registry` at http://ADDRESS/metrics.
class MetricsEndpoint {
 public:
  // `address` is host:port; port 0 picks a free port. UNAVAILABLE when the
  // address cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& address, const std::shared_ptr<prometheus::Registry>& registry);
  int port() const { return port_; }

 private:
  MetricsEndpoint() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

// One unlabelled series of a new family in `registry`.
prometheus::Gauge& NewGauge(prometheus::Registry& registry, const std::string& name,
                            const std::string& help);
prometheus::Counter& NewCounter(prometheus::Registry& registry, const std::string& name,
                                const std::string& help);
// A histogram series with LatencyBuckets().
prometheus::Histogram& NewHistogram(prometheus::Registry& registry, const std::string& name,
                                    const std::string& help, const prometheus::Labels& labels = {});

// Latency buckets for request and step durations, 0.5 ms to ~65 s.
prometheus::Histogram::BucketBoundaries LatencyBuckets();
// Buckets for short computations (one tensor's update), 10 us to ~40 s.
prometheus::Histogram::BucketBoundaries FineLatencyBuckets();

// The interceptor factory that records, per method:
//   muonps_grpc_server_handled_total{grpc_service, grpc_method, grpc_code}
//   muonps_grpc_server_handling_seconds{grpc_service, grpc_method} (histogram)
//   muonps_grpc_server_in_flight_requests{grpc_service, grpc_method}
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeGrpcMetricsInterceptor(
    std::shared_ptr<prometheus::Registry> registry);

}  // namespace muonps

#endif  // MUONPS_RPC_METRICS_H_
