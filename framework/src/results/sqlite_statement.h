// Thin RAII wrappers over the SQLite C API for the results database: a
// prepared statement (reset and reused across rows) and a transaction that rolls
// back unless committed. Errors carry SQLite's message; callers add the path.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "inferlab/result.h"

namespace inferlab::sqlite {

class Statement {
 public:
  // Prepares the first statement of `sql`; *tail (when given) receives the rest.
  // Error: SQLite's message and the SQL. An empty statement prepares to null.
  static Result<Statement> prepare(sqlite3* db, std::string_view sql, std::string_view* tail = nullptr) {
    sqlite3_stmt* stmt = nullptr;
    const char* rest = nullptr;
    if (sqlite3_prepare_v2(db, sql.data(), int(sql.size()), &stmt, &rest) != SQLITE_OK)
      return Error{std::string(sqlite3_errmsg(db)) + " (in SQL: " + std::string(sql) + ")"};
    if (tail != nullptr) *tail = sql.substr(size_t(rest - sql.data()));
    return Statement(stmt);
  }

  bool empty() const { return stmt_ == nullptr; }

  // Parameters are numbered from 1, as in SQLite.
  Statement& bind(int i, int64_t v) { return check(sqlite3_bind_int64(get(), i, v)); }
  Statement& bind(int i, int v) { return bind(i, int64_t(v)); }
  Statement& bind(int i, bool v) { return bind(i, int64_t(v ? 1 : 0)); }
  Statement& bind(int i, double v) { return check(sqlite3_bind_double(get(), i, v)); }
  Statement& bind(int i, std::string_view v) {
    return check(sqlite3_bind_text64(get(), i, v.data(), v.size(), SQLITE_TRANSIENT, SQLITE_UTF8));
  }
  Statement& bind(int i, const std::string& v) { return bind(i, std::string_view(v)); }
  Statement& bind(int i, const char* v) { return bind(i, std::string_view(v)); }
  Statement& bind_null(int i) { return check(sqlite3_bind_null(get(), i)); }
  Statement& bind(int i, std::optional<bool> v) {
    return v ? bind(i, *v) : check(sqlite3_bind_null(get(), i));
  }

  // SQLITE_ROW, SQLITE_DONE or an error code (a failed bind is reported here).
  int step() {
    if (bind_rc_ != SQLITE_OK) return bind_rc_;
    return sqlite3_step(get());
  }
  // Steps once and resets, for statements that return no rows. On failure the
  // statement is left as it is, so sqlite3_errmsg still describes the error.
  bool run() {
    const int rc = step();
    if (rc != SQLITE_DONE && rc != SQLITE_ROW) return false;
    reset();
    return true;
  }
  void reset() {
    sqlite3_reset(get());
    sqlite3_clear_bindings(get());
    bind_rc_ = SQLITE_OK;
  }

  bool is_null(int col) { return sqlite3_column_type(get(), col) == SQLITE_NULL; }
  int64_t int64(int col) { return sqlite3_column_int64(get(), col); }
  double real(int col) { return sqlite3_column_double(get(), col); }
  std::string text(int col) {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(get(), col));
    return p == nullptr ? std::string() : std::string(p, size_t(sqlite3_column_bytes(get(), col)));
  }

  sqlite3_stmt* get() const { return stmt_.get(); }

 private:
  struct Finalizer {
    void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
  };
  explicit Statement(sqlite3_stmt* stmt) : stmt_(stmt) {}
  Statement& check(int rc) {
    if (bind_rc_ == SQLITE_OK) bind_rc_ = rc;
    return *this;
  }

  std::unique_ptr<sqlite3_stmt, Finalizer> stmt_;
  int bind_rc_ = SQLITE_OK;
};

// BEGIN IMMEDIATE takes the write lock up front, so the busy timeout applies to
// it and a deferred read lock is never upgraded (which fails at once in WAL mode).
class Transaction {
 public:
  explicit Transaction(sqlite3* db) : db_(db) {
    started_ = sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK;
  }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  ~Transaction() {
    if (started_ && !committed_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }

  bool started() const { return started_; }
  bool commit() {
    committed_ = sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr) == SQLITE_OK;
    return committed_;
  }

 private:
  sqlite3* db_;
  bool started_ = false;
  bool committed_ = false;
};

// Executes SQL without results (several statements allowed); false on error.
inline bool exec(sqlite3* db, const char* sql) { return sqlite3_exec(db, sql, nullptr, nullptr, nullptr) == SQLITE_OK; }

}  // namespace inferlab::sqlite
