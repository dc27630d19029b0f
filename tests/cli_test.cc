// The command line as people expect it: help for every command, one error
// line and status 2 for what it cannot take.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include "tests/test_util.h"

namespace muonps {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

struct Result {
  int status;
  std::string out, err;
};

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

int Lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

class CliTest : public testing_util::TempDirTest {
 protected:
  // `muonps ARGS` to its end.
  Result Muonps(const std::string& args) {
    const std::string out = Path("out"), err = Path("err");
    const int rc =
        std::system((std::string(MUONPS_BINARY) + " " + args + " > " + out + " 2> " + err).c_str());
    return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, Slurp(out), Slurp(err)};
  }
};

TEST_F(CliTest, HelpListsEveryCommand) {
  for (const char* args : {"help", "--help", "-h"}) {
    const Result r = Muonps(args);
    EXPECT_EQ(r.status, 0) << args << ": " << r.err;
    for (const char* command :
         {"train", "local", "coordinator", "shard", "worker", "submit", "watch", "list", "status",
          "cancel", "validate", "defaults", "numerics", "version"}) {
      EXPECT_THAT(r.out, HasSubstr(std::string("  ") + command + " ")) << args;
    }
  }
}

TEST_F(CliTest, CommandHelpPrintsItsUsageAndFlags) {
  for (const char* args : {"train --help", "help train", "train -h"}) {
    const Result r = Muonps(args);
    EXPECT_EQ(r.status, 0) << args << ": " << r.err;
    EXPECT_THAT(r.out, HasSubstr("usage: muonps train")) << args;
    EXPECT_THAT(r.out, HasSubstr("--until")) << args;
    EXPECT_THAT(r.out, HasSubstr("--threads")) << args;
    EXPECT_THAT(r.out, Not(HasSubstr("--min_shards"))) << args;
    EXPECT_THAT(r.out + r.err, Not(HasSubstr("No flags matched"))) << args;
  }
  const Result shard = Muonps("help shard");
  EXPECT_EQ(shard.status, 0);
  EXPECT_THAT(shard.out, HasSubstr("--coordinator"));
  EXPECT_THAT(shard.out, HasSubstr("--blas_core"));
}

TEST_F(CliTest, UnknownCommandsAndFlagsAreOneLineAndStatus2) {
  Result r = Muonps("frobnicate");
  EXPECT_EQ(r.status, 2);
  EXPECT_THAT(r.err, HasSubstr("muonps: error: unknown command \"frobnicate\""));
  EXPECT_THAT(r.err, HasSubstr("muonps help"));
  EXPECT_EQ(Lines(r.err), 1) << r.err;

  r = Muonps("help frobnicate");
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(Lines(r.err), 1) << r.err;

  r = Muonps("train --frob=1");
  EXPECT_EQ(r.status, 2);
  EXPECT_THAT(r.err, HasSubstr("unknown flag --frob"));
  EXPECT_THAT(r.err, HasSubstr("muonps help train"));
  EXPECT_EQ(Lines(r.err), 1) << r.err;

  r = Muonps("");
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(Lines(r.err), 1) << r.err;
}

TEST_F(CliTest, EveryCommandThatServesOrDialsListsTheTlsFlags) {
  for (const char* command :
       {"coordinator", "shard", "worker", "local", "submit", "watch", "list", "status", "cancel"}) {
    const Result r = Muonps(std::string("help ") + command);
    EXPECT_EQ(r.status, 0) << command << ": " << r.err;
    for (const char* flag : {"--tls_cert", "--tls_key", "--tls_ca", "--tls_server_name"}) {
      EXPECT_THAT(r.out, HasSubstr(flag)) << command;
    }
  }
  EXPECT_THAT(Muonps("help train").out, Not(HasSubstr("--tls_cert")));
}

TEST_F(CliTest, FlagValuesGivenAsSeparateArgumentsAreNotCommands) {
  const Result r = Muonps("--coordinator 127.0.0.1:1 --blas_core portable version");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("muonps "));
}

TEST_F(CliTest, UntilOutsideTheScheduleIsRefused) {
  for (const char* value : {"0", "-3", "201"}) {
    const Result r = Muonps(std::string("train --until=") + value);
    EXPECT_EQ(r.status, 2) << value;
    EXPECT_THAT(r.err, HasSubstr("--until: must be in [1, 200]")) << value;
    EXPECT_EQ(Lines(r.err), 1) << r.err;
  }
}

TEST_F(CliTest, OnePrefixInAbseilsOwnHelp) {
  const Result r = Muonps("--helpfull");
  EXPECT_THAT(r.out + r.err, Not(HasSubstr("muonps: muonps:")));
}

}  // namespace
}  // namespace muonps
