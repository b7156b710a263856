// The coordinator's job table in SQLite: every job as its serialized protobuf, written on each
// state change, so a restarted coordinator loses nothing (WAL journal, synchronous=NORMAL).
#pragma once
#include <string>
#include <vector>

#include "proto/kvtp.pb.h"

struct sqlite3;

namespace kvtp::launcher {

class JobStore {
 public:
  explicit JobStore(const std::string& path);
  ~JobStore();
  JobStore(const JobStore&) = delete;
  JobStore& operator=(const JobStore&) = delete;

  std::vector<kvtp::v1::Job> loadAll();  // in creation order
  void save(const kvtp::v1::Job& job);   // insert or replace
  int64_t lastSequence();                // the largest job number stored (0 if none)

 private:
  void exec(const char* sql);
  sqlite3* db_ = nullptr;
  std::string path_;
};

}  // namespace kvtp::launcher
