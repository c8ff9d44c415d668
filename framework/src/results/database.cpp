#include "results/database.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <iterator>
#include <system_error>
#include <thread>

#include "results/sqlite_statement.h"

namespace inferlab {

namespace {

using sqlite::Statement;
using sqlite::Transaction;

// Schema version 1, created in an empty file. Metric values may be NULL because
// SQLite stores NaN as NULL. `seconds` is denormalized so SQL needs no arithmetic.
constexpr const char* kSchemaV1 = R"sql(
CREATE TABLE experiments (
  id          INTEGER PRIMARY KEY,
  name        TEXT NOT NULL UNIQUE,
  description TEXT NOT NULL DEFAULT '',
  config_path TEXT NOT NULL DEFAULT '',
  created_at  REAL NOT NULL
);
CREATE TABLE runs (
  id             INTEGER PRIMARY KEY,
  experiment_id  INTEGER NOT NULL REFERENCES experiments(id),
  hash           TEXT NOT NULL UNIQUE,
  label          TEXT NOT NULL,
  plugin         TEXT NOT NULL,
  plugin_version TEXT NOT NULL DEFAULT '',
  task           TEXT NOT NULL,
  baseline       INTEGER NOT NULL DEFAULT 0 CHECK (baseline IN (0, 1)),
  config_json    TEXT NOT NULL DEFAULT '',
  model          TEXT NOT NULL DEFAULT '',
  model_checksum TEXT NOT NULL DEFAULT '',
  backend        TEXT NOT NULL DEFAULT '',
  device         TEXT NOT NULL DEFAULT '',
  git_revision   TEXT NOT NULL DEFAULT '',
  status         TEXT NOT NULL CHECK (status IN ('finished', 'failed')),
  error          TEXT NOT NULL DEFAULT '',
  started_at     REAL,
  finished_at    REAL,
  seconds        REAL
);
CREATE INDEX runs_by_experiment ON runs(experiment_id, task);
CREATE TABLE metrics (
  run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  name   TEXT NOT NULL,
  value  REAL,
  unit   TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (run_id, name)
) WITHOUT ROWID;
CREATE INDEX metrics_by_name ON metrics(name);
CREATE TABLE samples (
  run_id          INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  idx             INTEGER NOT NULL,
  input_tokens    INTEGER NOT NULL DEFAULT 0,
  expected        TEXT NOT NULL DEFAULT '',
  produced        TEXT NOT NULL DEFAULT '',
  correct         INTEGER CHECK (correct IN (0, 1)),
  latency_seconds REAL,
  detail_json     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX samples_by_run ON samples(run_id, idx);
CREATE VIEW run_metrics AS
  SELECT r.id AS run_id, e.name AS experiment, r.label, r.plugin, r.task, r.baseline, r.status,
         m.name AS metric, m.value, m.unit
  FROM runs r JOIN experiments e ON e.id = r.experiment_id JOIN metrics m ON m.run_id = r.id;
)sql";

bool create_schema_v1(sqlite3* db) { return sqlite::exec(db, kSchemaV1); }

// Version 2: fine-tuning runs (`inferlab finetune`) and their training curves.
// A run is keyed by its config hash, so a resumed run continues its own row
// and its steps (INSERT OR REPLACE by step) are never duplicated.
constexpr const char* kSchemaV2 = R"sql(
CREATE TABLE finetunes (
  id             INTEGER PRIMARY KEY,
  hash           TEXT NOT NULL UNIQUE,
  name           TEXT NOT NULL,
  config_json    TEXT NOT NULL DEFAULT '',
  model          TEXT NOT NULL DEFAULT '',
  model_checksum TEXT NOT NULL DEFAULT '',
  output         TEXT NOT NULL DEFAULT '',
  git_revision   TEXT NOT NULL DEFAULT '',
  status         TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
  error          TEXT NOT NULL DEFAULT '',
  summary_json   TEXT NOT NULL DEFAULT '',
  started_at     REAL,
  finished_at    REAL
);
CREATE TABLE finetune_steps (
  finetune_id INTEGER NOT NULL REFERENCES finetunes(id) ON DELETE CASCADE,
  step        INTEGER NOT NULL,
  loss        REAL,
  lr          REAL,
  grad_norm   REAL,
  tokens      INTEGER NOT NULL DEFAULT 0,
  seconds     REAL,
  eval_loss   REAL,
  PRIMARY KEY (finetune_id, step)
) WITHOUT ROWID;
)sql";

bool create_schema_v2(sqlite3* db) { return sqlite::exec(db, kSchemaV2); }

// kMigrations[v] brings a database at version v to version v + 1. They run in
// one transaction together with the user_version update, so a crash leaves the
// old version intact. Version 2 is one more function appended here.
using Migration = bool (*)(sqlite3*);
constexpr Migration kMigrations[] = {create_schema_v1, create_schema_v2};
static_assert(std::size(kMigrations) == ResultsDb::kSchemaVersion);

// A connection and the file it is about, for error messages.
struct Conn {
  sqlite3* db;
  const std::filesystem::path& path;

  Error fail(const std::string& what) const {
    return Error{fmt::format("{}: {}: {}", path.string(), what, sqlite3_errmsg(db))};
  }
  Result<Statement> prepare(std::string_view sql) const {
    auto st = Statement::prepare(db, sql);
    if (!st) return Error{fmt::format("{}: {}", path.string(), st.message())};
    return st;
  }
  Status exec(const char* sql, const std::string& what) const {
    return sqlite::exec(db, sql) ? ok_status() : Status(fail(what));
  }
};

// How long a writer waits for another one's lock (ResultsDb::configure).
constexpr int kBusyTimeoutMs = 60'000;

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// What a file holds, read without changing it. `schema` is "main" or an attachment.
struct FileKind {
  int64_t version = 0;
  bool has_tables = false;
};

Error not_sqlite(const std::filesystem::path& file) {
  return Error{fmt::format("{}: not a SQLite database (file is not a database); pass the path of an inferlab "
                           "results database", file.string())};
}

// One integer, read with the raw API so that a file that is not SQLite shows as SQLITE_NOTADB.
Result<int64_t> read_integer(const Conn& c, const std::filesystem::path& file, const std::string& sql) {
  sqlite3_stmt* raw = nullptr;
  int rc = sqlite3_prepare_v2(c.db, sql.c_str(), -1, &raw, nullptr);
  if (rc == SQLITE_OK) rc = sqlite3_step(raw);
  const int64_t value = rc == SQLITE_ROW ? sqlite3_column_int64(raw, 0) : 0;
  const std::string message = sqlite3_errmsg(c.db);
  sqlite3_finalize(raw);
  if (rc == SQLITE_NOTADB) return not_sqlite(file);
  if (rc != SQLITE_ROW) return Error{fmt::format("{}: cannot read the database: {}", file.string(), message)};
  return value;
}

Result<FileKind> read_kind(const Conn& c, const std::filesystem::path& file, const std::string& schema) {
  auto version = read_integer(c, file, fmt::format("PRAGMA {}.user_version", schema));
  if (!version) return version.error();
  auto tables = read_integer(c, file, fmt::format("SELECT count(*) FROM {}.sqlite_master", schema));
  if (!tables) return tables.error();
  return FileKind{*version, *tables > 0};
}

// Both reads share one read transaction: between two autocommit reads another
// process may commit the schema, and its tables would appear without their version.
Result<FileKind> inspect(const Conn& c, const std::filesystem::path& file, const std::string& schema) {
  const bool own_transaction = sqlite3_get_autocommit(c.db) != 0;
  if (own_transaction && !sqlite::exec(c.db, "BEGIN")) return c.fail("cannot start a read transaction");
  auto kind = read_kind(c, file, schema);
  if (own_transaction) sqlite::exec(c.db, "ROLLBACK");  // it only read
  return kind;
}

Status check_kind(const std::filesystem::path& file, const FileKind& kind) {
  if (kind.version > ResultsDb::kSchemaVersion)
    return Error{fmt::format("{}: results database schema version {} is newer than this inferlab supports ({}); "
                             "use a newer inferlab", file.string(), kind.version, ResultsDb::kSchemaVersion)};
  if (kind.version < 0 || (kind.version == 0 && kind.has_tables))
    return Error{fmt::format("{}: a SQLite database, but not an inferlab results database (it has tables and no "
                             "inferlab schema version); pass another path", file.string())};
  return ok_status();
}

// Switching a new file to WAL takes an exclusive lock for which SQLite does not
// call the busy handler, so two processes creating the file at once retry here.
Status enable_wal(const Conn& c) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (true) {
    const int rc = sqlite3_exec(c.db, "PRAGMA journal_mode = WAL", nullptr, nullptr, nullptr);
    if (rc == SQLITE_OK) return ok_status();
    if (rc != SQLITE_BUSY || std::chrono::steady_clock::now() > deadline) return c.fail("cannot switch to WAL mode");
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

std::string describe(const RunRecord& run) { return fmt::format("run {} on {} ({})", run.label, run.task, run.hash); }

// The existing run with this hash: its id, and whether it finished.
struct ExistingRun {
  int64_t id = 0;
  bool finished = false;
};

Result<std::optional<ExistingRun>> find_run(const Conn& c, const std::string& hash) {
  auto st = c.prepare("SELECT id, status = 'finished' FROM runs WHERE hash = ?1");
  if (!st) return st.error();
  st->bind(1, hash);
  const int rc = st->step();
  if (rc == SQLITE_DONE) return std::optional<ExistingRun>();
  if (rc != SQLITE_ROW) return c.fail("looking up run " + hash);
  return std::optional<ExistingRun>(ExistingRun{st->int64(0), st->int64(1) != 0});
}

Result<int64_t> upsert_experiment(const Conn& c, const RunRecord& run) {
  // The description and config path follow the latest run; created_at stays the first.
  auto st = c.prepare(
      "INSERT INTO experiments(name, description, config_path, created_at) VALUES (?1, ?2, ?3, ?4) "
      "ON CONFLICT(name) DO UPDATE SET description = excluded.description, config_path = excluded.config_path "
      "RETURNING id");
  if (!st) return st.error();
  st->bind(1, run.experiment).bind(2, run.experiment_description).bind(3, run.config_path).bind(4, unix_now());
  if (st->step() != SQLITE_ROW) return c.fail("recording experiment " + run.experiment);
  return st->int64(0);
}

Result<int64_t> insert_run(const Conn& c, int64_t experiment_id, const RunRecord& run) {
  auto st = c.prepare(
      "INSERT INTO runs(experiment_id, hash, label, plugin, plugin_version, task, baseline, config_json, model, "
      "model_checksum, backend, device, git_revision, status, error, started_at, finished_at, seconds) "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)");
  if (!st) return st.error();
  st->bind(1, experiment_id).bind(2, run.hash).bind(3, run.label).bind(4, run.plugin).bind(5, run.plugin_version);
  st->bind(6, run.task).bind(7, run.baseline).bind(8, run.config_json).bind(9, run.model);
  st->bind(10, run.model_checksum).bind(11, run.backend).bind(12, run.device).bind(13, run.git_revision);
  st->bind(14, std::string(run_status_name(run.status))).bind(15, run.error).bind(16, run.started_at).bind(17, run.finished_at);
  st->bind(18, run.finished_at - run.started_at);
  if (!st->run()) return c.fail("recording " + describe(run));
  return int64_t(sqlite3_last_insert_rowid(c.db));
}

Status insert_metrics(const Conn& c, int64_t run_id, const RunRecord& run) {
  auto st = c.prepare("INSERT INTO metrics(run_id, name, value, unit) VALUES (?1, ?2, ?3, ?4)");
  if (!st) return st.error();
  for (const MetricValue& m : run.metrics) {
    st->bind(1, run_id).bind(2, m.name).bind(3, m.value).bind(4, m.unit);
    if (!st->run()) return c.fail(fmt::format("recording metric {} of {}", m.name, describe(run)));
  }
  return ok_status();
}

Status insert_samples(const Conn& c, int64_t run_id, const RunRecord& run) {
  auto st = c.prepare(
      "INSERT INTO samples(run_id, idx, input_tokens, expected, produced, correct, latency_seconds, detail_json) "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)");
  if (!st) return st.error();
  for (const SampleRow& s : run.samples) {
    st->bind(1, run_id).bind(2, s.index).bind(3, s.input_tokens).bind(4, s.expected).bind(5, s.produced);
    st->bind(6, s.correct).bind(7, s.latency_seconds).bind(8, s.detail_json);
    if (!st->run()) return c.fail(fmt::format("recording sample {} of {}", s.index, describe(run)));
  }
  return ok_status();
}

// One value of an ad-hoc query as text.
std::optional<std::string> cell_text(Statement& st, int col) {
  switch (sqlite3_column_type(st.get(), col)) {
    case SQLITE_NULL: return std::nullopt;
    case SQLITE_INTEGER: return std::to_string(st.int64(col));
    case SQLITE_FLOAT: return format_real(st.real(col));
    case SQLITE_BLOB: return fmt::format("<{}-byte blob>", sqlite3_column_bytes(st.get(), col));
    default: return st.text(col);
  }
}

// Attaches another database file for the lifetime of this object (ATTACH and
// DETACH cannot run inside a transaction, so this outlives the merge's).
class Attachment {
 public:
  Attachment(sqlite3* db, const std::filesystem::path& file, const char* name) : db_(db), name_(name) {
    auto st = Statement::prepare(db, fmt::format("ATTACH ?1 AS {}", name));
    attached_ = st && st->bind(1, file.string()).run();
  }
  Attachment(const Attachment&) = delete;
  Attachment& operator=(const Attachment&) = delete;
  ~Attachment() {
    if (attached_) sqlite::exec(db_, fmt::format("DETACH {}", name_).c_str());
  }
  bool attached() const { return attached_; }

 private:
  sqlite3* db_;
  std::string name_;
  bool attached_ = false;
};

// Copies the finished runs of merge_src that main lacks; main's unfinished runs
// with the same hash give way. Experiments are matched by name and runs by hash,
// which remaps the ids of both tables whichever way they were numbered.
constexpr const char* kMergeSql = R"sql(
DROP TABLE IF EXISTS temp.merge_runs;
CREATE TEMP TABLE merge_runs AS
  SELECT r.id AS src_id, r.hash AS hash FROM merge_src.runs r
  WHERE r.status = 'finished'
    AND NOT EXISTS (SELECT 1 FROM main.runs m WHERE m.hash = r.hash AND m.status = 'finished');
DELETE FROM main.runs WHERE hash IN (SELECT hash FROM temp.merge_runs);
INSERT INTO main.experiments(name, description, config_path, created_at)
  SELECT e.name, e.description, e.config_path, e.created_at FROM merge_src.experiments e
  WHERE e.id IN (SELECT r.experiment_id FROM merge_src.runs r JOIN temp.merge_runs t ON t.src_id = r.id)
  ON CONFLICT(name) DO NOTHING;
INSERT INTO main.runs(experiment_id, hash, label, plugin, plugin_version, task, baseline, config_json, model,
                      model_checksum, backend, device, git_revision, status, error, started_at, finished_at, seconds)
  SELECT me.id, r.hash, r.label, r.plugin, r.plugin_version, r.task, r.baseline, r.config_json, r.model,
         r.model_checksum, r.backend, r.device, r.git_revision, r.status, r.error, r.started_at, r.finished_at,
         r.seconds
  FROM temp.merge_runs t
  JOIN merge_src.runs r ON r.id = t.src_id
  JOIN merge_src.experiments se ON se.id = r.experiment_id
  JOIN main.experiments me ON me.name = se.name
  ORDER BY r.id;
INSERT INTO main.metrics(run_id, name, value, unit)
  SELECT mr.id, m.name, m.value, m.unit
  FROM temp.merge_runs t JOIN main.runs mr ON mr.hash = t.hash JOIN merge_src.metrics m ON m.run_id = t.src_id;
INSERT INTO main.samples(run_id, idx, input_tokens, expected, produced, correct, latency_seconds, detail_json)
  SELECT mr.id, s.idx, s.input_tokens, s.expected, s.produced, s.correct, s.latency_seconds, s.detail_json
  FROM temp.merge_runs t JOIN main.runs mr ON mr.hash = t.hash JOIN merge_src.samples s ON s.run_id = t.src_id
  ORDER BY mr.id, s.rowid;
)sql";

Result<int64_t> count_merged_runs(const Conn& c) {
  auto count = c.prepare("SELECT count(*) FROM temp.merge_runs");
  if (!count) return count.error();
  if (count->step() != SQLITE_ROW) return c.fail("counting merged runs");
  return count->int64(0);
}

}  // namespace

const char* run_status_name(RunStatus status) { return status == RunStatus::Finished ? "finished" : "failed"; }

std::optional<RunStatus> parse_run_status(std::string_view name) {
  if (name == "finished") return RunStatus::Finished;
  if (name == "failed") return RunStatus::Failed;
  return std::nullopt;
}

namespace {

StoredRun read_run_row(Statement& st) {
  StoredRun r;
  r.id = st.int64(0);
  std::string status;
  std::string* text[] = {&r.hash, &r.label, &r.plugin, &r.plugin_version, &r.task, &r.config_json, &r.model,
                         &r.model_checksum, &r.backend, &r.device, &r.git_revision, &status, &r.error};
  for (size_t i = 0; i < std::size(text); ++i) *text[i] = st.text(int(i) + 1);
  r.status = parse_run_status(status).value_or(RunStatus::Failed);  // anything else is not finished
  r.baseline = st.int64(14) != 0;
  r.started_at = st.real(15);
  r.finished_at = st.real(16);
  return r;
}

}  // namespace

void ResultsDb::Closer::operator()(sqlite3* db) const { sqlite3_close_v2(db); }

Error ResultsDb::error(const std::string& what) const { return Conn{db_.get(), path_}.fail(what); }

Result<ResultsDb> ResultsDb::open(const std::filesystem::path& path) {
  std::error_code ec;
  if (path.empty()) return Error{"the results database path is empty; pass a file path such as results/inferlab.db"};
  if (std::filesystem::is_directory(path, ec))
    return Error{fmt::format("{}: is a folder; pass the path of a results database file", path.string())};
  ec.clear();  // is_directory sets it for a file not there yet: a bare name such as "x.db" is fine
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path(), ec);
  if (ec)
    return Error{fmt::format("{}: cannot create its folder: {}", path.string(), ec.message())};
  sqlite3* raw = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr);
  ResultsDb db(path, raw);  // owns the handle even when opening failed
  if (rc != SQLITE_OK) return db.error("cannot open the results database");
  if (auto s = db.configure(); !s) return s.error();
  if (auto s = db.migrate(); !s) return s.error();
  return db;
}

Status ResultsDb::configure() {
  const Conn c{db_.get(), path_};
  // Writers wait for each other instead of failing: a run's transaction is short,
  // but a shard may hold the lock while another one merges.
  sqlite3_busy_timeout(c.db, kBusyTimeoutMs);
  // Refuse a foreign or newer file before changing anything in it (WAL mode included).
  auto kind = inspect(c, path_, "main");
  if (!kind) return kind.error();
  if (auto s = check_kind(path_, *kind); !s) return s;
  // WAL: readers never block the writer, and a killed writer leaves only an
  // uncommitted tail that the next open discards. NORMAL skips the fsync of each
  // commit: a power cut may lose the last runs but never corrupts the file, and
  // a killed process loses nothing it committed.
  if (auto s = enable_wal(c); !s) return s;
  return c.exec("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON", "cannot configure the connection");
}

Status ResultsDb::migrate() {
  const Conn c{db_.get(), path_};
  auto kind = inspect(c, path_, "main");
  if (!kind) return kind.error();
  if (kind->version == kSchemaVersion) return ok_status();  // the common case takes no write lock
  Transaction tx(c.db);
  if (!tx.started()) return c.fail("cannot lock the database to create its schema");
  kind = inspect(c, path_, "main");  // another process may have migrated it meanwhile
  if (!kind) return kind.error();
  if (auto s = check_kind(path_, *kind); !s) return s;
  for (int64_t v = kind->version; v < kSchemaVersion; ++v)
    if (!kMigrations[v](c.db)) return c.fail(fmt::format("cannot upgrade the schema from version {} to {}", v, v + 1));
  const std::string set_version = fmt::format("PRAGMA user_version = {}", kSchemaVersion);
  if (auto s = c.exec(set_version.c_str(), "cannot set the schema version"); !s) return s;
  if (!tx.commit()) return c.fail("cannot commit the schema");
  return ok_status();
}

Result<bool> ResultsDb::has_finished_run(const std::string& hash) {
  auto existing = find_run(Conn{db_.get(), path_}, hash);
  if (!existing) return existing.error();
  return existing->has_value() && (*existing)->finished;
}

Status ResultsDb::check_writable(std::chrono::milliseconds wait, std::uintmax_t min_free_bytes) {
  const Conn c{db_.get(), path_};
  std::error_code ec;
  const auto folder = path_.has_parent_path() ? path_.parent_path() : std::filesystem::path(".");
  const std::filesystem::space_info space = std::filesystem::space(folder, ec);
  if (!ec && space.available < min_free_bytes)
    return Error{fmt::format("{}: the disk holding it has {} MiB free, below the {} MiB kept for recording runs "
                             "(INFERLAB_DB_MIN_FREE_MB); free some space or pass another --db",
                             path_.string(), space.available >> 20, min_free_bytes >> 20)};
  sqlite3_busy_timeout(c.db, int(wait.count()));
  const int rc = sqlite3_exec(c.db, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr);
  const std::string message = sqlite3_errmsg(c.db);
  sqlite3_busy_timeout(c.db, kBusyTimeoutMs);
  if (rc == SQLITE_OK) {
    // A write the rollback undoes: a read-only file, folder or file system, or a
    // full disk, shows here rather than after the first run.
    const int wrote = sqlite3_exec(c.db, "CREATE TABLE inferlab_write_probe (x)", nullptr, nullptr, nullptr);
    const std::string write_message = sqlite3_errmsg(c.db);
    sqlite3_exec(c.db, "ROLLBACK", nullptr, nullptr, nullptr);
    if (wrote == SQLITE_OK) return ok_status();
    return Error{fmt::format("{}: cannot be written: {}; pass a writable --db", path_.string(), write_message)};
  }
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return Error{fmt::format("{}: locked by another program (no write lock within {} s: another inferlab, or a "
                               "database browser with uncommitted changes?); close it or pass another --db",
                               path_.string(), double(wait.count()) / 1000.0)};
    case SQLITE_READONLY:
      return Error{fmt::format("{}: read-only (the file, its folder or its file system); pass a writable --db",
                               path_.string())};
    case SQLITE_FULL:
      return Error{fmt::format("{}: the disk is full; free some space or pass another --db", path_.string())};
    default:
      return Error{fmt::format("{}: cannot be written: {}; pass a writable --db", path_.string(), message)};
  }
}

Status ResultsDb::record_run(const RunRecord& run) {
  const Conn c{db_.get(), path_};
  Transaction tx(c.db);
  if (!tx.started()) return c.fail("cannot lock the database to record " + describe(run));
  auto existing = find_run(c, run.hash);
  if (!existing) return existing.error();
  if (existing->has_value() && (*existing)->finished) return ok_status();  // the first finished result stands
  if (existing->has_value()) {
    auto del = c.prepare("DELETE FROM runs WHERE id = ?1");  // metrics and samples cascade
    if (!del) return del.error();
    if (!del->bind(1, (*existing)->id).run()) return c.fail("replacing the unfinished " + describe(run));
  }
  auto experiment_id = upsert_experiment(c, run);
  if (!experiment_id) return experiment_id.error();
  auto run_id = insert_run(c, *experiment_id, run);
  if (!run_id) return run_id.error();
  if (auto s = insert_metrics(c, *run_id, run); !s) return s;
  if (auto s = insert_samples(c, *run_id, run); !s) return s;
  if (!tx.commit()) return c.fail("cannot commit " + describe(run));
  return ok_status();
}

Result<QueryResult> ResultsDb::query(const std::string& sql) {
  const auto sql_error = [&] {
    return Error{fmt::format("{}: {} (in SQL: {})", path_.string(), sqlite3_errmsg(db_.get()), sql)};
  };
  std::string_view rest;
  auto st = Statement::prepare(db_.get(), sql, &rest);
  if (!st) return Error{fmt::format("{}: {}", path_.string(), st.message())};
  if (st->empty()) return Error{fmt::format("{}: no SQL statement given", path_.string())};
  auto next = Statement::prepare(db_.get(), rest);  // only comments and blanks may follow
  if (!next || !next->empty())
    return Error{fmt::format("{}: give one SQL statement at a time (in SQL: {})", path_.string(), sql)};

  QueryResult out;
  const int n = sqlite3_column_count(st->get());
  for (int i = 0; i < n; ++i) out.columns.emplace_back(sqlite3_column_name(st->get(), i));
  int rc;
  while ((rc = st->step()) == SQLITE_ROW) {
    auto& row = out.rows.emplace_back();
    for (int i = 0; i < n; ++i) row.push_back(cell_text(*st, i));
  }
  if (rc != SQLITE_DONE) return sql_error();
  if (n == 0 && !sqlite3_stmt_readonly(st->get())) {
    out.columns = {"changes"};
    out.rows.push_back({std::to_string(sqlite3_changes64(db_.get()))});
  }
  return out;
}

Result<int64_t> ResultsDb::merge_from(const std::filesystem::path& other) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(other, ec))
    return Error{fmt::format("{}: no such results database", other.string())};
  if (std::filesystem::equivalent(other, path_, ec))
    return Error{fmt::format("{}: cannot merge a database into itself", other.string())};
  const Conn c{db_.get(), path_};
  Attachment src(c.db, other, "merge_src");
  if (!src.attached() && sqlite3_errcode(c.db) == SQLITE_NOTADB) return not_sqlite(other);
  if (!src.attached())
    return Error{fmt::format("{}: cannot open it to merge: {}", other.string(), sqlite3_errmsg(c.db))};
  auto kind = inspect(c, other, "merge_src");
  if (!kind) return kind.error();
  if (auto s = check_kind(other, *kind); !s) return s.error();
  // An empty file has nothing to give. A future older version must be migrated
  // first: ResultsDb::open on it does that.
  if (kind->version == 0) return int64_t(0);

  Transaction tx(c.db);
  if (!tx.started()) return c.fail("cannot lock the database to merge " + other.string());
  if (auto s = c.exec(kMergeSql, "merging " + other.string()); !s) return s.error();
  auto added = count_merged_runs(c);
  if (!added) return added.error();
  if (auto s = c.exec("DROP TABLE temp.merge_runs", "merging " + other.string()); !s) return s.error();
  if (!tx.commit()) return c.fail("cannot commit the merge of " + other.string());
  return *added;
}

Result<int64_t> ResultsDb::begin_finetune(const FinetuneRecord& run) {
  const Conn c{db_.get(), path_};
  auto st = c.prepare(
      "INSERT INTO finetunes (hash, name, config_json, model, model_checksum, output, git_revision, status, "
      "started_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'running', ?8) "
      "ON CONFLICT(hash) DO UPDATE SET status = 'running', error = '', finished_at = NULL");
  if (!st) return st.error();
  st->bind(1, run.hash);
  st->bind(2, run.name);
  st->bind(3, run.config_json);
  st->bind(4, run.model);
  st->bind(5, run.model_checksum);
  st->bind(6, run.output);
  st->bind(7, run.git_revision);
  st->bind(8, unix_now());
  if (st->step() != SQLITE_DONE) return c.fail("recording fine-tuning run " + run.name);
  auto id = c.prepare("SELECT id FROM finetunes WHERE hash = ?1");
  if (!id) return id.error();
  id->bind(1, run.hash);
  if (id->step() != SQLITE_ROW) return c.fail("reading back fine-tuning run " + run.name);
  return id->int64(0);
}

Status ResultsDb::record_finetune_steps(int64_t id, std::span<const FinetuneStep> steps) {
  const Conn c{db_.get(), path_};
  Transaction tx(c.db);
  if (!tx.started()) return c.fail("cannot lock the database to record training steps");
  auto st = c.prepare(
      "INSERT OR REPLACE INTO finetune_steps (finetune_id, step, loss, lr, grad_norm, tokens, seconds, eval_loss) "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)");
  if (!st) return st.error();
  for (const FinetuneStep& s : steps) {
    st->reset();
    st->bind(1, id);
    st->bind(2, s.step);
    st->bind(3, s.loss);
    st->bind(4, s.lr);
    st->bind(5, s.grad_norm);
    st->bind(6, s.tokens);
    st->bind(7, s.seconds);
    if (s.eval_loss) st->bind(8, *s.eval_loss);
    else st->bind_null(8);
    if (st->step() != SQLITE_DONE) return c.fail("recording training step " + std::to_string(s.step));
  }
  if (!tx.commit()) return c.fail("cannot commit training steps");
  return ok_status();
}

Status ResultsDb::finish_finetune(int64_t id, bool finished, const std::string& error,
                                  const std::string& summary_json) {
  const Conn c{db_.get(), path_};
  auto st = c.prepare("UPDATE finetunes SET status = ?2, error = ?3, summary_json = ?4, finished_at = ?5 WHERE id = ?1");
  if (!st) return st.error();
  st->bind(1, id);
  st->bind(2, std::string(finished ? "finished" : "failed"));
  st->bind(3, error);
  st->bind(4, summary_json);
  st->bind(5, unix_now());
  if (st->step() != SQLITE_DONE) return c.fail("finishing fine-tuning run");
  return ok_status();
}

Result<std::vector<ExperimentInfo>> ResultsDb::experiments() {
  const Conn c{db_.get(), path_};
  auto st = c.prepare(
      "SELECT e.name, e.description, e.config_path, e.created_at, "
      "(SELECT count(*) FROM runs r WHERE r.experiment_id = e.id) "
      "FROM experiments e ORDER BY e.created_at DESC, e.id DESC");
  if (!st) return st.error();
  std::vector<ExperimentInfo> out;
  int rc;
  while ((rc = st->step()) == SQLITE_ROW)
    out.push_back({st->text(0), st->text(1), st->text(2), st->real(3), st->int64(4)});
  if (rc != SQLITE_DONE) return c.fail("listing experiments");
  return out;
}

Result<std::vector<StoredRun>> ResultsDb::experiment_runs(const std::string& experiment) {
  const Conn c{db_.get(), path_};
  auto runs = c.prepare(
      "SELECT r.id, r.hash, r.label, r.plugin, r.plugin_version, r.task, r.config_json, r.model, r.model_checksum, "
      "r.backend, r.device, r.git_revision, r.status, r.error, r.baseline, r.started_at, r.finished_at "
      "FROM runs r JOIN experiments e ON e.id = r.experiment_id WHERE e.name = ?1 ORDER BY r.id");
  if (!runs) return runs.error();
  std::vector<StoredRun> out;
  std::map<int64_t, size_t> by_id;
  int rc;
  for (runs->bind(1, experiment); (rc = runs->step()) == SQLITE_ROW;) {
    by_id[runs->int64(0)] = out.size();
    out.push_back(read_run_row(*runs));
  }
  if (rc != SQLITE_DONE) return c.fail("reading the runs of experiment " + experiment);

  auto metrics = c.prepare(
      "SELECT m.run_id, m.name, m.value, m.unit FROM metrics m JOIN runs r ON r.id = m.run_id "
      "JOIN experiments e ON e.id = r.experiment_id WHERE e.name = ?1");
  if (!metrics) return metrics.error();
  for (metrics->bind(1, experiment); (rc = metrics->step()) == SQLITE_ROW;) {
    const auto it = by_id.find(metrics->int64(0));
    if (it == by_id.end()) continue;  // a run written between the two reads
    const double value = metrics->is_null(2) ? std::nan("") : metrics->real(2);
    out[it->second].metrics[metrics->text(1)] = MetricValue{metrics->text(1), value, metrics->text(3)};
  }
  if (rc != SQLITE_DONE) return c.fail("reading the metrics of experiment " + experiment);

  auto samples = c.prepare(
      "SELECT s.run_id, s.idx, s.input_tokens, s.correct, s.detail_json FROM samples s JOIN runs r ON r.id = s.run_id "
      "JOIN experiments e ON e.id = r.experiment_id WHERE e.name = ?1 ORDER BY s.run_id, s.idx");
  if (!samples) return samples.error();
  for (samples->bind(1, experiment); (rc = samples->step()) == SQLITE_ROW;) {
    const auto it = by_id.find(samples->int64(0));
    if (it == by_id.end()) continue;
    StoredSample sample{samples->int64(1), samples->int64(2), std::nullopt, samples->text(4)};
    if (!samples->is_null(3)) sample.correct = samples->int64(3) != 0;
    out[it->second].samples.push_back(std::move(sample));
  }
  if (rc != SQLITE_DONE) return c.fail("reading the samples of experiment " + experiment);
  return out;
}

}  // namespace inferlab
