// `inferlab finetune CONFIG.toml`: LoRA / QLoRA fine-tuning (finetune/finetune.h).
#include <fmt/format.h>

#include <cstdio>
#include <iostream>
#include <string>

#include "cli/commands.h"
#include "datasets/tasks.h"
#include "experiment/config.h"
#include "finetune/finetune.h"

namespace inferlab::cli {

namespace {

int run_finetune_command(const std::string& config_path, const std::string& db, bool restart, bool no_db) {
  const Catalog catalog{task_catalog(), {}};
  auto config = load_finetune_config(config_path, catalog);
  if (!config) {
    std::fprintf(stderr, "inferlab: %s\n", config.message().c_str());
    return 2;
  }
  finetune::FinetuneOptions options;
  if (!no_db) options.db = db;
  options.progress = &std::cerr;
  options.restart = restart;
  auto report = finetune::run_finetune(*config, options);
  if (!report) {
    std::fprintf(stderr, "inferlab: %s\n", report.message().c_str());
    return 1;
  }
  std::printf("%s\n", report->output.c_str());
  return 0;
}

}  // namespace

void register_finetune_command(CLI::App& app) {
  static std::string config, db = "results/inferlab.db";
  static bool restart = false, no_db = false;
  auto* f = app.add_subcommand("finetune",
                               "LoRA / QLoRA fine-tuning from a config ([model] and [finetune]); resumes from its "
                               "checkpoint after an interruption; writes a PEFT adapter folder");
  f->add_option("config", config, "fine-tuning config (TOML)")->required();
  f->add_option("--db", db, "results database for the training curve")->capture_default_str();
  f->add_flag("--no-db", no_db, "record no training curve");
  f->add_flag("--restart", restart, "discard the checkpoint an earlier run of this config left, and start over");
  f->callback([] { set_exit_code(run_finetune_command(config, db, restart, no_db)); });
}

}  // namespace inferlab::cli
