// inferlab command line: one subcommand per job; every error is one line on
// stderr and a non-zero exit.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>

#include "cli/commands.h"
#include "engine/device.h"

int main(int argc, char** argv) {
  inferlab::select_blas_kernels(argv);
  CLI::App app{"inferlab: a research framework for LLM inference-efficiency methods"};
  app.require_subcommand(1);
  app.set_version_flag("--version", INFERLAB_VERSION_STRING);
  inferlab::cli::register_commands(app);
  inferlab::cli::register_experiment_commands(app);
  inferlab::cli::register_finetune_command(app);
  inferlab::cli::register_slurm_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::fprintf(stderr, "inferlab: %s\n", e.what());
    return 2;
  }
  return inferlab::cli::exit_code();
}
