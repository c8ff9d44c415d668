#pragma once

#include <CLI/CLI.hpp>

namespace inferlab::cli {

// Adds every subcommand; each one's callback runs the command and records the
// exit code returned by exit_code().
void register_commands(CLI::App& app);
int exit_code();

}  // namespace inferlab::cli
