#include "rpc/grpc_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/impl/server_builder_plugin.h>
#include <grpcpp/impl/server_initializer.h>

#include <chrono>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "rpc/metrics.h"
#include "rpc/security.h"

namespace muonps {
namespace {

// gRPC tells only its builder plugins which services a server registered.
// This one hands their names out, so that health can answer for each of them
// by name (a Kubernetes probe may ask for "muonps.v1.ShardService"), not only
// for the whole server ("").
class ServiceNamesPlugin final : public grpc::ServerBuilderPlugin {
 public:
  explicit ServiceNamesPlugin(std::vector<std::string>* names) : names_(names) {}
  std::string name() override { return "muonps_service_names"; }
  void InitServer(grpc::ServerInitializer*) override {}
  void Finish(grpc::ServerInitializer* initializer) override {
    *names_ = *initializer->GetServiceList();
  }
  void ChangeArguments(const std::string&, void*) override {}

 private:
  std::vector<std::string>* names_;
};

class ServiceNamesOption final : public grpc::ServerBuilderOption {
 public:
  explicit ServiceNamesOption(std::vector<std::string>* names) : names_(names) {}
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->push_back(std::make_unique<ServiceNamesPlugin>(names_));
  }

 private:
  std::vector<std::string>* names_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GrpcServer>> GrpcServer::Start(
    const GrpcServerOptions& options, const std::vector<grpc::Service*>& services) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  const bool tls = TransportUsesTls();
  builder.AddListeningPort(options.address, ServerTransportCredentials(), &port);
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  // gRPC sets SO_REUSEPORT by default, so a second server on a busy port
  // would silently share it; refuse instead.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20);
  builder.AddChannelArgument(GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, 1 << 20);
  builder.AddChannelArgument(GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, 8 << 20);
  std::unique_ptr<GrpcServer> server(new GrpcServer());
  for (grpc::Service* service : services) builder.RegisterService(service);
  if (options.metrics != nullptr) {
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
    creators.push_back(MakeGrpcMetricsInterceptor(options.metrics));
    builder.experimental().SetInterceptorCreators(std::move(creators));
  }
  std::vector<std::string> service_names;
  builder.SetOption(std::make_unique<ServiceNamesOption>(&service_names));
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.address));
  }
  if (!tls && !IsLoopbackAddress(options.address)) {
    // Plaintext is meant for loopback; elsewhere it is allowed, but said loudly.
    std::fprintf(stderr,
                 "WARNING: muonps is listening without TLS on %s: anyone who can reach this port "
                 "can call every rpc of this server (submit and cancel jobs, join the cluster, "
                 "read and overwrite the model); give --tls_cert, --tls_key and --tls_ca\n",
                 options.address.c_str());
    std::fflush(stderr);
  }
  // Health knows a service once it has a status; SetServing then covers it.
  server->health_names_ = service_names;
  server->port_ = port;
  const std::string host = options.address.substr(0, options.address.rfind(':'));
  server->address_ = absl::StrCat(host == "0.0.0.0" ? "127.0.0.1" : host, ":", port);
  server->SetServing(false);
  return server;
}

GrpcServer::~GrpcServer() { Shutdown(0.0); }

void GrpcServer::SetServing(bool serving) {
  if (server_ == nullptr) return;
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);
  for (const std::string& name : health_names_) health->SetServingStatus(name, serving);
}

void GrpcServer::Shutdown(double grace_seconds) {
  if (server_ == nullptr) return;
  SetServing(false);
  server_->Shutdown(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(grace_seconds * 1000)));
  server_->Wait();
  server_.reset();
}

}  // namespace muonps
