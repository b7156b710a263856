#include "launcher/job_store.h"

#include <sqlite3.h>

#include "runtime/error.h"

namespace kvtp::launcher {

namespace {
// Job ids are "job-<n>"; n orders them.
int64_t sequenceOf(const std::string& id) { return id.rfind("job-", 0) == 0 ? std::stoll(id.substr(4)) : 0; }
}  // namespace

JobStore::JobStore(const std::string& path) : path_(path) {
  if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) {
    const std::string msg = db_ ? sqlite3_errmsg(db_) : "out of memory";
    sqlite3_close(db_);
    db_ = nullptr;
    throw Error("cannot open job database '" + path + "': " + msg);
  }
  sqlite3_busy_timeout(db_, 5000);
  exec("PRAGMA journal_mode=WAL");
  exec("PRAGMA synchronous=NORMAL");
  exec("CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, job BLOB NOT NULL)");
}

JobStore::~JobStore() { sqlite3_close(db_); }

void JobStore::exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    const std::string msg = err ? err : "?";
    sqlite3_free(err);
    throw Error("job database '" + path_ + "': " + msg);
  }
}

std::vector<kvtp::v1::Job> JobStore::loadAll() {
  sqlite3_stmt* st = nullptr;
  sqlite3_prepare_v2(db_, "SELECT id, job FROM jobs ORDER BY seq", -1, &st, nullptr);
  std::vector<kvtp::v1::Job> jobs;
  while (sqlite3_step(st) == SQLITE_ROW) {
    kvtp::v1::Job j;
    const void* blob = sqlite3_column_blob(st, 1);
    if (!j.ParseFromArray(blob, sqlite3_column_bytes(st, 1))) {
      sqlite3_finalize(st);
      throw Error("job database '" + path_ + "': job '" + reinterpret_cast<const char*>(sqlite3_column_text(st, 0)) +
                  "' is corrupt");
    }
    jobs.push_back(std::move(j));
  }
  sqlite3_finalize(st);
  return jobs;
}

void JobStore::save(const kvtp::v1::Job& job) {
  const std::string blob = job.SerializeAsString();
  sqlite3_stmt* st = nullptr;
  sqlite3_prepare_v2(db_, "INSERT OR REPLACE INTO jobs (seq, id, job) VALUES (?, ?, ?)", -1, &st, nullptr);
  sqlite3_bind_int64(st, 1, sequenceOf(job.id()));
  sqlite3_bind_text(st, 2, job.id().c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_blob(st, 3, blob.data(), int(blob.size()), SQLITE_TRANSIENT);
  const int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) throw Error("job database '" + path_ + "': cannot save " + job.id() + ": " + sqlite3_errmsg(db_));
}

int64_t JobStore::lastSequence() {
  sqlite3_stmt* st = nullptr;
  sqlite3_prepare_v2(db_, "SELECT COALESCE(MAX(seq), 0) FROM jobs", -1, &st, nullptr);
  int64_t n = 0;
  if (sqlite3_step(st) == SQLITE_ROW) n = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return n;
}

}  // namespace kvtp::launcher
