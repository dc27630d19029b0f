// The command line's own help and checks, before abseil parses the flags:
// `muonps help [COMMAND]`, `muonps COMMAND --help`, unknown commands and
// flags refused with one line and exit status 2.
#ifndef MUONPS_CLI_HELP_H_
#define MUONPS_CLI_HELP_H_

#include <optional>
#include <string>

namespace muonps {

// What muonps is and the usage line of every command ("  muonps train
// [JOB.json] ..."), for abseil's usage message (`muonps --helpfull`).
std::string UsageMessage();

// Prints the help of `command` ("" for the overview: every command) to
// stdout. 0, or 2 with an error line on stderr for an unknown command.
int PrintHelp(const std::string& command);

// Looks at the raw command line: answers help requests (exit status 0),
// refuses an unknown command or an unknown flag (status 2, one
// `muonps: error: ...` line naming it and how to list what exists). Returns
// the status to exit with, or nullopt to go on with normal parsing. Call
// after every flag is registered (i.e. from main), before parsing.
std::optional<int> PreParseCommandLine(int argc, char** argv);

// True when `--NAME` or `--NAME=...` is on the command line.
bool FlagGiven(int argc, char** argv, const std::string& name);

}  // namespace muonps

#endif  // MUONPS_CLI_HELP_H_
