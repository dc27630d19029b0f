// Transport security (rpc/security.h) against real `muonps` processes: a
// cluster whose every channel is mutual TLS trains bit-identically to
// `muonps train`; callers without a certificate of the cluster's CA, and
// plaintext callers, are refused and change nothing; clients refuse a server
// of another CA or of another name; an incomplete or unusable flag set stops
// a process at start-up naming the flag; plaintext off loopback warns.
//
// Every test makes its certificates with the openssl CLI (skipped where it is
// absent): the cluster's CA, a member certificate (server and client, named
// IP:127.0.0.1 and DNS:localhost), a user certificate (client only), and an
// intruder certificate with the member's names but signed by an unrelated CA.
#include <grpcpp/grpcpp.h>
#include <stdlib.h>

#include "absl/strings/ascii.h"
#include "muonps/v1/coordinator.grpc.pb.h"
#include "rpc/security.h"
#include "tests/cluster_fixture.h"

namespace muonps {
namespace {

// Extensions of the certificates the tests make (openssl's config format).
constexpr char kOpensslConfig[] = R"([req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[member]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
[user]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
)";

// Makes ca, other-ca, member, user (signed by ca) and intruder (signed by
// other-ca, the member's extensions) as NAME.pem and NAME.key, and
// both-cas.pem, a bundle of both CAs.
constexpr char kMakeCertificates[] = R"(set -e
ca() {
  openssl req -config openssl.cnf -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -nodes -days 2 -subj "/CN=$1" -extensions ca -keyout "$1.key" -out "$1.pem"
}
leaf() {  # NAME CA EXTENSIONS
  openssl req -config openssl.cnf -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$1" -keyout "$1.key" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -days 2 \
    -extfile openssl.cnf -extensions "$3" -out "$1.pem"
}
ca ca
ca other-ca
leaf member ca member
leaf user ca user
leaf intruder other-ca member
cat ca.pem other-ca.pem > both-cas.pem
)";

class TlsTest : public ClusterTest {
 protected:
  void SetUp() override {
    ClusterTest::SetUp();
    if (std::system("command -v openssl > /dev/null 2>&1") != 0) {
      GTEST_SKIP() << "the openssl command is not installed";
    }
    std::ofstream(Path("openssl.cnf")) << kOpensslConfig;
    std::ofstream(Path("make_certificates.sh")) << kMakeCertificates;
    const int rc = std::system(
        absl::StrCat("cd '", dir(), "' && sh make_certificates.sh > openssl.log 2>&1").c_str());
    ASSERT_EQ(rc, 0) << ReadWholeFile(Path("openssl.log"));
  }

  // The --tls_* flags of a process holding certificate NAME and trusting `ca`.
  std::vector<std::string> Tls(const std::string& name, const std::string& ca = "ca") const {
    return {"--tls_cert=" + Path(name + ".pem"), "--tls_key=" + Path(name + ".key"),
            "--tls_ca=" + Path(ca + ".pem")};
  }
  static std::vector<std::string> With(std::vector<std::string> a,
                                       const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }

  // Starts a coordinator as NAME (extra flags: `extra`) and waits for its
  // port; sets coordinator_ and returns it.
  std::string StartCoordinatorWith(const std::string& name, const std::vector<std::string>& extra,
                                   const std::string& listen = "127.0.0.1:0") {
    const std::string port_file = Path(name + ".port");
    ChildProcess& c = Start(
        name,
        With({"coordinator", "--listen=" + listen, "--port_file=" + port_file, "--min_shards=1",
              "--lease_seconds=1.5", "--heartbeat_seconds=0.25", "--checkpoint_root=" + dir()},
             extra));
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    int port = 0;
    while (port <= 0 && !c.Exited() && std::chrono::steady_clock::now() < deadline) {
      std::ifstream(port_file) >> port;
      if (port <= 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_GT(port, 0) << name << " did not write " << port_file << "; "
                       << DescribeStatus(c.status()) << "\n"
                       << ReadWholeFile(c.err_path());
    coordinator_ = absl::StrCat("127.0.0.1:", port);
    return coordinator_;
  }

  // Runs client command `args` (with --coordinator and `tls`) to its end.
  struct Outcome {
    int code;
    std::string out, err;
  };
  Outcome Client(const std::string& name, std::vector<std::string> args,
                 const std::vector<std::string>& tls, double seconds = 30.0) {
    args.push_back("--coordinator=" + coordinator_);
    ChildProcess& c = Start(name, With(std::move(args), tls));
    const int code = Finish(c, seconds);
    return {code, ReadWholeFile(c.out_path()), ReadWholeFile(c.err_path())};
  }

  // `muonps list --json` as the user; the jobs.
  v1::ListJobsResponse ListJobs() {
    const Outcome list =
        Client(absl::StrCat("list-", children_.size()), {"list", "--json"}, Tls("user"));
    EXPECT_EQ(list.code, 0) << list.err;
    v1::ListJobsResponse response;
    EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(list.out, &response).ok()) << list.out;
    return response;
  }

  // A JobService stub of an in-process channel with `credentials`.
  std::unique_ptr<v1::JobService::Stub> Stub(
      const std::shared_ptr<grpc::ChannelCredentials>& credentials) {
    return v1::JobService::NewStub(grpc::CreateChannel(coordinator_, credentials));
  }
  // The PEM text of NAME.pem or NAME.key.
  std::string Pem(const std::string& file) const { return ReadWholeFile(Path(file)); }
};

// --- A mutual-TLS cluster computes exactly what `muonps train` computes -------

TEST_F(TlsTest, MutualTlsClusterIsBitIdenticalToTrain) {
  const JobOptions o;
  WriteJob("train", o);
  WriteJob("cluster", o);
  StartCoordinatorWith("coordinator", Tls("member"));
  StartShard(0, With({"--checkpoint_root=" + dir()}, Tls("member")));
  ChildProcess& worker = StartWorker("worker", With({"--data_root=" + dir()}, Tls("member")));
  WaitForLog(worker, "registered as");
  const Outcome submit = Client("submit", {"submit", Path("cluster.json")}, Tls("user"));
  ASSERT_EQ(submit.code, 0) << submit.err;
  std::string id = submit.out;
  absl::StripAsciiWhitespace(&id);
  const Outcome watch = Client("watch", {"watch", id, "--json"}, Tls("user"), kCommandSeconds);
  ASSERT_EQ(watch.code, 0) << "the job did not succeed: " << watch.err;
  ExpectSameCheckpoint(Train("train"), CheckpointOf("cluster", 20));
  // Nothing listened without TLS, so nothing warned.
  for (const char* log : {"coordinator.log", "shard-0.log", "worker.log"}) {
    EXPECT_EQ(ReadWholeFile(Path(log)).find("WARNING"), std::string::npos) << log;
  }
}

// `muonps local` hands its --tls_* flags to every service it starts.
TEST_F(TlsTest, LocalRunsItsServicesWithItsTls) {
  JobOptions o;
  o.total_steps = 6;
  WriteJob("train", o);
  WriteJob("cluster", o);
  const std::vector<std::string> args = With(
      {"local", Path("cluster.json"), "--shards=1", "--workers=1", "--threads=1",
       "--log_dir=" + Path("local-cluster"), "--checkpoint_root=" + dir(), "--data_root=" + dir()},
      Tls("member"));
  ASSERT_EQ(Run("local-cluster", args), 0) << ReadWholeFile(Path("local-cluster.log"));
  ExpectSameCheckpoint(Train("train"), CheckpointOf("cluster", 6));
  const std::string shard_log = ReadWholeFile(Path("local-cluster/shard-0.log"));
  EXPECT_NE(shard_log.find("registered as"), std::string::npos) << shard_log;
}

// --- Who may call ----------------------------------------------------------------

TEST_F(TlsTest, CallersWithoutACertificateOfTheCaAreRefused) {
  WriteJob("queued", JobOptions());
  StartCoordinatorWith("coordinator", Tls("member"));
  // No shard: the job the user submits stays queued.
  const Outcome submit = Client("submit", {"submit", Path("queued.json")}, Tls("user"));
  ASSERT_EQ(submit.code, 0) << submit.err;
  std::string id = submit.out;
  absl::StripAsciiWhitespace(&id);
  const v1::ListJobsResponse before = ListJobs();
  ASSERT_EQ(before.jobs_size(), 1);
  EXPECT_EQ(before.jobs(0).state(), v1::JOB_STATE_QUEUED);

  // TLS that trusts the coordinator but presents no certificate.
  grpc::SslCredentialsOptions anonymous;
  anonymous.pem_root_certs = Pem("ca.pem");
  // A certificate of another CA, with the member's very names.
  grpc::SslCredentialsOptions intruder = anonymous;
  intruder.pem_cert_chain = Pem("intruder.pem");
  intruder.pem_private_key = Pem("intruder.key");
  for (const auto& [who, options] :
       {std::pair<const char*, grpc::SslCredentialsOptions>{"without a certificate", anonymous},
        {"with another CA's certificate", intruder}}) {
    SCOPED_TRACE(who);
    auto stub = Stub(grpc::SslCredentials(options));
    {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      v1::SubmitJobRequest request;
      *request.mutable_spec() = *LoadJobSpecFile(Path("queued.json"));
      v1::SubmitJobResponse response;
      const grpc::Status st = stub->SubmitJob(&context, request, &response);
      EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
    }
    {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      v1::CancelJobRequest request;
      request.set_job_id(id);
      v1::CancelJobResponse response;
      const grpc::Status st = stub->CancelJob(&context, request, &response);
      EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
    }
  }
  // The CLI with the intruder's certificate, trusting both CAs (so that its
  // own certificate verifies and the coordinator's too).
  const Outcome intruder_submit =
      Client("intruder-submit", {"submit", Path("queued.json")}, Tls("intruder", "both-cas"));
  EXPECT_EQ(intruder_submit.code, 1) << intruder_submit.err;
  EXPECT_NE(intruder_submit.err.find("SubmitJob"), std::string::npos) << intruder_submit.err;
  const Outcome intruder_cancel =
      Client("intruder-cancel", {"cancel", id}, Tls("intruder", "both-cas"));
  EXPECT_EQ(intruder_cancel.code, 1) << intruder_cancel.err;
  EXPECT_NE(intruder_cancel.err.find("CancelJob"), std::string::npos) << intruder_cancel.err;

  const v1::ListJobsResponse after = ListJobs();
  ASSERT_EQ(after.jobs_size(), 1) << "a refused caller changed the job list";
  EXPECT_EQ(after.jobs(0).job_id(), id);
  EXPECT_EQ(after.jobs(0).state(), v1::JOB_STATE_QUEUED);
}

TEST_F(TlsTest, PlaintextAndTlsDoNotMix) {
  StartCoordinatorWith("tls-coordinator", Tls("member"));
  // Plaintext clients of a TLS server: the CLI and an in-process channel.
  Outcome list = Client("plain-list", {"list"}, {});
  EXPECT_EQ(list.code, 1) << list.err;
  EXPECT_NE(list.err.find("ListJobs"), std::string::npos) << list.err;
  EXPECT_NE(list.err.find("if the server requires TLS, give --tls_cert"), std::string::npos)
      << list.err;
  {
    auto stub = Stub(grpc::InsecureChannelCredentials());
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ListJobsResponse response;
    const grpc::Status st = stub->ListJobs(&context, v1::ListJobsRequest(), &response);
    EXPECT_FALSE(st.ok());
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  }
  // The same server with TLS answers.
  list = Client("tls-list", {"list"}, Tls("user"));
  EXPECT_EQ(list.code, 0) << list.err;

  // A TLS client of a plaintext server.
  StartCoordinatorWith("plain-coordinator", {});
  list = Client("tls-list-of-plain", {"list"}, Tls("user"));
  EXPECT_EQ(list.code, 1) << list.err;
  list = Client("plain-list-of-plain", {"list"}, {});
  EXPECT_EQ(list.code, 0) << list.err;
}

// Clients check the server too: its CA, and that it bears the name dialled
// (or --tls_server_name).
TEST_F(TlsTest, ClientsRefuseAServerOfAnotherCaOrName) {
  StartCoordinatorWith("intruder-coordinator", Tls("intruder", "other-ca"));
  Outcome list = Client("list-of-intruder", {"list"}, Tls("user"));
  EXPECT_EQ(list.code, 1) << list.err;

  StartCoordinatorWith("coordinator", Tls("member"));
  list = Client("list-as-localhost", {"list", "--tls_server_name=localhost"}, Tls("user"));
  EXPECT_EQ(list.code, 0) << list.err;
  list = Client("list-as-elsewhere", {"list", "--tls_server_name=elsewhere.example"}, Tls("user"));
  EXPECT_EQ(list.code, 1) << list.err;
}

// --- Start-up refusals and the plaintext warning ---------------------------------

TEST_F(TlsTest, IncompleteOrUnusableFlagsRefuseToStart) {
  struct Case {
    std::vector<std::string> flags;
    std::vector<std::string> said;  // in the error line
  };
  const std::string cert = "--tls_cert=" + Path("member.pem");
  const std::string key = "--tls_key=" + Path("member.key");
  const std::string ca = "--tls_ca=" + Path("ca.pem");
  const std::vector<Case> cases = {
      {{cert, ca}, {"--tls_key is missing"}},
      {{key}, {"--tls_cert and --tls_ca are missing"}},
      {{"--tls_server_name=localhost"}, {"--tls_server_name is only for TLS"}},
      {{cert, "--tls_key=" + Path("absent.key"), ca},
       {"--tls_key: cannot read " + Path("absent.key")}},
      {{cert, key, "--tls_ca=" + Path("openssl.cnf")}, {"--tls_ca: ", "holds no PEM certificate"}},
      {{cert, "--tls_key=" + Path("user.key"), ca}, {"--tls_key: ", "is not the key"}},
      {{"--tls_cert=" + Path("intruder.pem"), "--tls_key=" + Path("intruder.key"), ca},
       {"--tls_cert: ", "does not verify against --tls_ca"}},
  };
  int n = 0;
  for (const Case& c : cases) {
    for (const char* command : {"coordinator", "shard", "worker", "list", "local"}) {
      SCOPED_TRACE(absl::StrCat(command, " ", absl::StrJoin(c.flags, " ")));
      ChildProcess& child =
          Start(absl::StrCat("refused-", n++), With({command, "--listen=127.0.0.1:0"}, c.flags));
      EXPECT_EQ(Finish(child, 30.0), 2);
      const std::string err = ReadWholeFile(child.err_path());
      EXPECT_EQ(err.rfind("muonps: error: ", 0), 0u) << err;
      for (const std::string& s : c.said) EXPECT_NE(err.find(s), std::string::npos) << err;
    }
  }
  // The environment counts as the flags.
  setenv("MUONPS_TLS_CA", Path("ca.pem").c_str(), 1);
  ChildProcess& child = Start("refused-env", {"list"});
  unsetenv("MUONPS_TLS_CA");
  EXPECT_EQ(Finish(child, 30.0), 2);
  EXPECT_NE(ReadWholeFile(child.err_path()).find("--tls_cert and --tls_key are missing"),
            std::string::npos)
      << ReadWholeFile(child.err_path());
}

TEST_F(TlsTest, PlaintextOffLoopbackWarnsOnce) {
  StartCoordinatorWith("open", {}, "0.0.0.0:0");
  StartCoordinatorWith("loopback", {});
  StartCoordinatorWith("tls-open", Tls("member"), "0.0.0.0:0");
  const std::string open = ReadWholeFile(Path("open.log"));
  const size_t warning = open.find("WARNING: muonps is listening without TLS on 0.0.0.0:0: anyone");
  EXPECT_NE(warning, std::string::npos) << open;
  EXPECT_EQ(open.find("WARNING", warning + 1), std::string::npos) << open;
  EXPECT_EQ(ReadWholeFile(Path("loopback.log")).find("WARNING"), std::string::npos);
  EXPECT_EQ(ReadWholeFile(Path("tls-open.log")).find("WARNING"), std::string::npos);
}

// --- The address check itself ----------------------------------------------------

TEST(IsLoopbackAddressTest, OnlyThisMachineCountsAsLoopback) {
  for (const char* address : {"127.0.0.1:0", "127.1.2.3:7070", "localhost:7070", "LOCALHOST:1",
                              "[::1]:7070", "[::ffff:127.0.0.1]:1", "unix:/tmp/muonps.sock"}) {
    EXPECT_TRUE(IsLoopbackAddress(address)) << address;
  }
  for (const char* address : {"0.0.0.0:7070", "[::]:7070", ":7070", "10.0.0.5:7071",
                              "shard-0.muonps-shard:7071", "[2001:db8::1]:7070", "128.0.0.1:1"}) {
    EXPECT_FALSE(IsLoopbackAddress(address)) << address;
  }
}

}  // namespace
}  // namespace muonps
