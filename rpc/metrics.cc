#include "rpc/metrics.h"

#include <chrono>
#include <cmath>
#include <exception>

#include "absl/base/attributes.h"
#include "absl/strings/str_cat.h"
#include "rpc/reaction_order.h"

namespace muonps {
namespace {

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN";
  }
}

struct GrpcFamilies {
  prometheus::Family<prometheus::Counter>* handled;
  prometheus::Family<prometheus::Histogram>* seconds;
  prometheus::Family<prometheus::Gauge>* in_flight;
};

// "/muonps.v1.ShardService/PushGradients" -> service, method.
void SplitMethod(const char* full, std::string* service, std::string* method) {
  const std::string s = full == nullptr ? "" : full;
  const size_t slash = s.rfind('/');
  if (slash == std::string::npos || slash == 0) {
    *service = "unknown";
    *method = s.empty() ? "unknown" : s;
    return;
  }
  *service = s.substr(1, slash - 1);
  *method = s.substr(slash + 1);
}

// Whether the batch sends the call's status, and which. A call on gRPC's
// batch object, which gRPC hands between its threads inside its
// uninstrumented core: kept out of ThreadSanitizer's sight, like the
// object's other users.
ABSL_ATTRIBUTE_NOINLINE ABSL_ATTRIBUTE_NO_SANITIZE_THREAD bool SendsStatus(
    grpc::experimental::InterceptorBatchMethods* methods, grpc::StatusCode* code) {
  if (!methods->QueryInterceptionHookPoint(
          grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
    return false;
  }
  *code = methods->GetSendStatus().error_code();
  return true;
}

// Hands the batch back to gRPC (see SendsStatus).
ABSL_ATTRIBUTE_NOINLINE ABSL_ATTRIBUTE_NO_SANITIZE_THREAD void Proceed(
    grpc::experimental::InterceptorBatchMethods* methods) {
  methods->Proceed();
}

// gRPC creates, calls and deletes one call's interceptor in order, from
// several of its threads: `order_` tells ThreadSanitizer so
// (rpc/reaction_order.h).
class MetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  MetricsInterceptor(grpc::experimental::ServerRpcInfo* info, const GrpcFamilies& families,
                     std::shared_ptr<prometheus::Registry> registry)
      : families_(families),
        registry_(std::move(registry)),
        start_(std::chrono::steady_clock::now()) {
    ReactionOrder::Scope scope(&order_);
    SplitMethod(info->method(), &service_, &method_);
    in_flight_ = &families_.in_flight->Add({{"grpc_service", service_}, {"grpc_method", method_}});
    in_flight_->Increment();
  }
  ~MetricsInterceptor() override {
    order_.Enter();
    in_flight_->Decrement();
    if (!finished_) Record(grpc::StatusCode::CANCELLED);
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    {
      ReactionOrder::Scope scope(&order_);
      grpc::StatusCode code;
      if (SendsStatus(methods, &code)) Record(code);
    }
    Proceed(methods);
  }

 private:
  void Record(grpc::StatusCode code) {
    finished_ = true;
    families_.handled
        ->Add({{"grpc_service", service_}, {"grpc_method", method_}, {"grpc_code", CodeName(code)}})
        .Increment();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    families_.seconds->Add({{"grpc_service", service_}, {"grpc_method", method_}}, LatencyBuckets())
        .Observe(seconds);
  }

  GrpcFamilies families_;
  std::shared_ptr<prometheus::Registry> registry_;  // keeps the families alive
  std::chrono::steady_clock::time_point start_;
  std::string service_, method_;
  prometheus::Gauge* in_flight_ = nullptr;
  bool finished_ = false;
  ReactionOrder order_;
};

class MetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit MetricsInterceptorFactory(std::shared_ptr<prometheus::Registry> registry)
      : registry_(std::move(registry)) {
    families_.handled = &prometheus::BuildCounter()
                             .Name("muonps_grpc_server_handled_total")
                             .Help("gRPC calls completed by the server, by method and status code")
                             .Register(*registry_);
    families_.seconds = &prometheus::BuildHistogram()
                             .Name("muonps_grpc_server_handling_seconds")
                             .Help("Time from a call's arrival to its status, by method")
                             .Register(*registry_);
    families_.in_flight = &prometheus::BuildGauge()
                               .Name("muonps_grpc_server_in_flight_requests")
                               .Help("gRPC calls in progress, by method")
                               .Register(*registry_);
  }
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new MetricsInterceptor(info, families_, registry_);
  }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  GrpcFamilies families_;
};

}  // namespace

prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  prometheus::Histogram::BucketBoundaries b;
  for (double x = 0.0005; x < 70.0; x *= 2.0) b.push_back(x);
  return b;
}

prometheus::Gauge& NewGauge(prometheus::Registry& r, const std::string& name,
                            const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r).Add({});
}

prometheus::Counter& NewCounter(prometheus::Registry& r, const std::string& name,
                                const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r).Add({});
}

prometheus::Histogram& NewHistogram(prometheus::Registry& r, const std::string& name,
                                    const std::string& help, const prometheus::Labels& labels) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add(labels,
                                                                            LatencyBuckets());
}

prometheus::Histogram::BucketBoundaries FineLatencyBuckets() {
  prometheus::Histogram::BucketBoundaries b;
  for (double x = 1e-5; x < 50.0; x *= 2.0) b.push_back(x);
  return b;
}

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& address, const std::shared_ptr<prometheus::Registry>& registry) {
  std::unique_ptr<MetricsEndpoint> endpoint(new MetricsEndpoint());
  try {
    endpoint->exposer_ = std::make_unique<prometheus::Exposer>(address, 2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, ": ", e.what()));
  }
  endpoint->exposer_->RegisterCollectable(registry);
  const std::vector<int> ports = endpoint->exposer_->GetListeningPorts();
  endpoint->port_ = ports.empty() ? 0 : ports[0];
  return endpoint;
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeGrpcMetricsInterceptor(
    std::shared_ptr<prometheus::Registry> registry) {
  return std::make_unique<MetricsInterceptorFactory>(std::move(registry));
}

}  // namespace muonps
