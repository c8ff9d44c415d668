// Results database paths as people type them: a bare file name opens in the
// current folder (`inferlab run x.toml --db x.db`).
#include <gtest/gtest.h>

#include <filesystem>

#include "results/database.h"
#include "test_support.h"

namespace inferlab {
namespace test_database_paths {

TEST(ResultsDbPaths, ABareFileNameOpensInTheCurrentFolder) {
  const auto dir = test::temp_path("bare-name");
  std::filesystem::create_directories(dir);
  const auto previous = std::filesystem::current_path();
  std::filesystem::current_path(dir);
  auto db = ResultsDb::open("bare.db");
  std::filesystem::current_path(previous);
  ASSERT_TRUE(db.ok()) << db.message();
  EXPECT_TRUE(std::filesystem::exists(dir / "bare.db"));
}

}  // namespace test_database_paths
}  // namespace inferlab
