#pragma once

#include <CLI/CLI.hpp>

namespace inferlab::cli {

// Adds every subcommand; each one's callback runs the command and records the
// exit code returned by exit_code().
void register_commands(CLI::App& app);
void register_experiment_commands(CLI::App& app);  // experiment_commands.cpp
void register_finetune_command(CLI::App& app);     // finetune_command.cpp
void register_slurm_command(CLI::App& app);        // slurm_command.cpp
int exit_code();
void set_exit_code(int code);

}  // namespace inferlab::cli
