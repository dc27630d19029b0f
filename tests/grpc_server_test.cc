// GrpcServer: a real server on loopback, probed through the standard
// grpc.health.v1 protocol with a stub generated from proto/grpc/health/v1.
#include "rpc/grpc_server.h"

#include <gtest/gtest.h>

#include "grpc/health/v1/health.grpc.pb.h"

namespace muonps {
namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

HealthCheckResponse::ServingStatus Check(const std::string& address, grpc::Status* status) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  std::unique_ptr<Health::Stub> stub = Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  HealthCheckRequest request;
  HealthCheckResponse response;
  *status = stub->Check(&context, request, &response);
  return response.status();
}

TEST(GrpcServerTest, HealthIsNotServingUntilReady) {
  absl::StatusOr<std::unique_ptr<GrpcServer>> server = GrpcServer::Start({}, {});
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_GT((*server)->port(), 0);

  grpc::Status status;
  EXPECT_EQ(Check((*server)->address(), &status), HealthCheckResponse::NOT_SERVING);
  ASSERT_TRUE(status.ok()) << status.error_message();

  (*server)->SetServing(true);
  EXPECT_EQ(Check((*server)->address(), &status), HealthCheckResponse::SERVING);
  ASSERT_TRUE(status.ok()) << status.error_message();

  (*server)->SetServing(false);
  EXPECT_EQ(Check((*server)->address(), &status), HealthCheckResponse::NOT_SERVING);
}

TEST(GrpcServerTest, UnknownServiceIsNotFound) {
  absl::StatusOr<std::unique_ptr<GrpcServer>> server = GrpcServer::Start({}, {});
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateChannel((*server)->address(), grpc::InsecureChannelCredentials());
  std::unique_ptr<Health::Stub> stub = Health::NewStub(channel);
  grpc::ClientContext context;
  HealthCheckRequest request;
  request.set_service("muonps.v1.NoSuchService");
  HealthCheckResponse response;
  EXPECT_EQ(stub->Check(&context, request, &response).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST(GrpcServerTest, AnAddressInUseIsAClearError) {
  absl::StatusOr<std::unique_ptr<GrpcServer>> first = GrpcServer::Start({}, {});
  ASSERT_TRUE(first.ok()) << first.status();
  GrpcServerOptions options;
  options.address = (*first)->address();
  absl::StatusOr<std::unique_ptr<GrpcServer>> second = GrpcServer::Start(options, {});
  ASSERT_FALSE(second.ok());
  EXPECT_NE(std::string(second.status().message()).find(options.address), std::string::npos);
}

}  // namespace
}  // namespace muonps
