#include "tiers/block_files.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"

namespace kvmem {
namespace {

constexpr char kSuffix[] = ".kvb";

// RESOURCE_EXHAUSTED for what may pass (no space, descriptors or memory), else INTERNAL.
absl::Status Errno(const char* what, const std::string& path) {
  const int e = errno;
  const bool exhausted =
      e == ENOSPC || e == EDQUOT || e == EMFILE || e == ENFILE || e == ENOMEM || e == EAGAIN;
  return absl::Status(
      exhausted ? absl::StatusCode::kResourceExhausted : absl::StatusCode::kInternal,
      absl::StrCat(what, " ", path, ": ", std::strerror(e)));
}

// fsyncs a directory so that a file created or removed in it stays so after a crash.
absl::Status SyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Errno("cannot open", dir);
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return Errno("cannot sync", dir);
  return absl::OkStatus();
}

// Moves past `bytes` done by a vectored read or write from iov[*first] on: whole vectors, then
// part of one after a short transfer.
void Skip(size_t bytes, std::vector<iovec>& iov, size_t* first) {
  while (*first < iov.size() && bytes >= iov[*first].iov_len) bytes -= iov[(*first)++].iov_len;
  if (bytes > 0) {
    iov[*first].iov_base = static_cast<char*>(iov[*first].iov_base) + bytes;
    iov[*first].iov_len -= bytes;
  }
}

}  // namespace

struct BlockFiles::File {
  ~File() {
    if (fd >= 0) ::close(fd);
  }
  std::string path;
  int fd = -1;
};

absl::StatusOr<std::unique_ptr<BlockFiles>> BlockFiles::Open(const std::string& dir,
                                                             const Options& options) {
  if (::mkdir(dir.c_str(), 0755) == 0) {
    // A new directory's own entry must last too, or files in it could vanish after a crash.
    const size_t slash = dir.find_last_of('/');
    const std::string parent = slash == std::string::npos ? "." : dir.substr(0, slash + 1);
    if (options.sync) KVMEM_RETURN_IF_ERROR(SyncDir(parent));
  } else if (errno != EEXIST) {
    return Errno("cannot create the block file directory", dir);
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::InternalError(absl::StrCat("block file directory ", dir, " is not a directory"));
  }
  return std::unique_ptr<BlockFiles>(new BlockFiles(dir, options));
}

BlockFiles::~BlockFiles() = default;

std::string BlockFiles::PathOf(uint64_t owner) const {
  return absl::StrFormat("%s/%016x%s", dir_, owner, kSuffix);
}

absl::StatusOr<std::shared_ptr<BlockFiles::File>> BlockFiles::Get(uint64_t owner, bool create) {
  uint64_t removals = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = open_.find(owner);
    if (it != open_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second.lru);
      return it->second.file;
    }
    removals = removals_;
  }
  // Open outside the lock: other owners' reads go on meanwhile.
  auto file = std::make_shared<File>();
  file->path = PathOf(owner);
  file->fd = ::open(file->path.c_str(), O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0644);
  if (file->fd < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat("block file ", file->path, " does not exist"));
    }
    return Errno("cannot open block file", file->path);
  }
  if (create && options_.sync) {
    // Whether this call or an earlier one (whose sync may have failed) created the file, its
    // directory entry is durable before anything is appended.
    KVMEM_RETURN_IF_ERROR(SyncDir(dir_));
  }
  std::lock_guard<std::mutex> lock(mu_);
  // A file removed while this opened it must not be cached: later appends would go to it.
  if (removals_ != removals) return file;
  auto [it, inserted] = open_.try_emplace(owner);
  if (!inserted) {  // another thread opened it first: use theirs
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    return it->second.file;
  }
  lru_.push_front(owner);
  it->second = {file, lru_.begin()};
  while (static_cast<int>(open_.size()) > std::max(1, options_.max_open_files)) {
    // Holders of an evicted file keep its descriptor until they let go.
    open_.erase(lru_.back());
    lru_.pop_back();
  }
  return file;
}

absl::Status BlockFiles::Append(uint64_t owner, const std::vector<std::string>& records,
                                std::vector<BlockFileRef>* refs) {
  std::vector<RecordPieces> pieces;
  pieces.reserve(records.size());
  for (const std::string& r : records) pieces.push_back({r});
  return Append(owner, pieces, refs);
}

absl::Status BlockFiles::Append(uint64_t owner, const std::vector<RecordPieces>& records,
                                std::vector<BlockFileRef>* refs) {
  refs->clear();
  if (records.empty()) return absl::OkStatus();
  for (const RecordPieces& r : records) {
    if (r.empty() || r.back().size() < 4) {
      return absl::InternalError("a block file record must end with its 4-byte CRC");
    }
  }
  auto file = Get(owner, /*create=*/true);
  if (!file.ok()) return file.status();
  const int fd = (*file)->fd;
  struct stat st;
  if (::fstat(fd, &st) != 0) return Errno("cannot stat block file", (*file)->path);
  // Append after whatever the file holds, including bytes of a commit a crash cut short.
  const uint64_t start = static_cast<uint64_t>(st.st_size);
  uint64_t offset = start;
  std::vector<iovec> iov;
  for (const RecordPieces& r : records) {
    uint64_t length = 0;
    for (std::string_view piece : r) {
      if (piece.empty()) continue;
      iov.push_back({const_cast<char*>(piece.data()), piece.size()});
      length += piece.size();
    }
    refs->push_back({offset, static_cast<uint32_t>(length), TrailingCrc(r.back())});
    offset += length;
  }
  absl::Status status;
  uint64_t at = start;
  size_t first = 0;
  while (first < iov.size() && status.ok()) {
    const int n = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    const ssize_t wrote = ::pwritev(fd, &iov[first], n, static_cast<off_t>(at));
    if (wrote < 0 && errno == EINTR) continue;
    if (wrote <= 0) {
      status = wrote < 0 ? Errno("cannot write block file", (*file)->path)
                         : absl::InternalError(absl::StrCat("block file ", (*file)->path,
                                                            " accepts no more bytes"));
      break;
    }
    at += static_cast<uint64_t>(wrote);
    Skip(static_cast<size_t>(wrote), iov, &first);
  }
  if (status.ok() && options_.sync && ::fdatasync(fd) != 0) {
    status = Errno("cannot sync block file", (*file)->path);
  }
  if (!status.ok()) {
    refs->clear();
    if (::ftruncate(fd, static_cast<off_t>(start)) != 0) {
      return absl::InternalError(
          absl::StrCat(status.message(), "; then could not cut it back: ", std::strerror(errno)));
    }
  }
  return status;
}

absl::StatusOr<std::string> BlockFiles::Read(uint64_t owner, const BlockFileRef& ref) {
  auto file = Get(owner, /*create=*/false);
  if (absl::IsNotFound(file.status())) return absl::DataLossError(file.status().message());
  if (!file.ok()) return file.status();
  std::string out(ref.length, '\0');
  size_t got = 0;
  while (got < out.size()) {
    const ssize_t n = ::pread((*file)->fd, out.data() + got, out.size() - got,
                              static_cast<off_t>(ref.offset + got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Errno("cannot read block file", (*file)->path);
    if (n == 0) {
      return absl::DataLossError(absl::StrCat("block file ", (*file)->path, " ends before byte ",
                                              ref.offset + ref.length, " that a block needs"));
    }
    got += static_cast<size_t>(n);
  }
  if (ref.length < 4 || TrailingCrc(out) != ref.crc) {
    return absl::DataLossError(absl::StrCat("block file ", (*file)->path,
                                            " holds other bytes than its reference at offset ",
                                            ref.offset));
  }
  return out;
}

absl::Status BlockFiles::ReadInto(uint64_t owner, const BlockFileRef& ref,
                                  const std::vector<MutablePiece>& pieces) {
  size_t total = 0;
  for (const MutablePiece& p : pieces) total += p.size;
  if (pieces.empty() || pieces.back().size < 4 || total != ref.length) {
    return absl::InternalError("block file read pieces do not match the record's length");
  }
  auto file = Get(owner, /*create=*/false);
  if (absl::IsNotFound(file.status())) return absl::DataLossError(file.status().message());
  if (!file.ok()) return file.status();
  std::vector<iovec> iov;
  iov.reserve(pieces.size());
  for (const MutablePiece& p : pieces) {
    if (p.size > 0) iov.push_back({p.data, p.size});
  }
  size_t got = 0, first = 0;
  while (got < total) {
    const int n = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    const ssize_t r = ::preadv((*file)->fd, &iov[first], n, static_cast<off_t>(ref.offset + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return Errno("cannot read block file", (*file)->path);
    if (r == 0) {
      return absl::DataLossError(absl::StrCat("block file ", (*file)->path, " ends before byte ",
                                              ref.offset + ref.length, " that a block needs"));
    }
    got += static_cast<size_t>(r);
    Skip(static_cast<size_t>(r), iov, &first);
  }
  const MutablePiece& last = pieces.back();
  if (TrailingCrc({last.data, last.size}) != ref.crc) {
    return absl::DataLossError(absl::StrCat("block file ", (*file)->path,
                                            " holds other bytes than its reference at offset ",
                                            ref.offset));
  }
  return absl::OkStatus();
}

absl::Status BlockFiles::CutBack(uint64_t owner, uint64_t length) {
  auto file = Get(owner, /*create=*/false);
  if (absl::IsNotFound(file.status())) return absl::OkStatus();
  if (!file.ok()) return file.status();
  struct stat st;
  if (::fstat((*file)->fd, &st) != 0) return Errno("cannot stat block file", (*file)->path);
  if (static_cast<uint64_t>(st.st_size) <= length) return absl::OkStatus();
  if (::ftruncate((*file)->fd, static_cast<off_t>(length)) != 0) {
    return Errno("cannot cut back block file", (*file)->path);
  }
  if (options_.sync && ::fdatasync((*file)->fd) != 0) {
    return Errno("cannot sync block file", (*file)->path);
  }
  return absl::OkStatus();
}

absl::Status BlockFiles::Remove(uint64_t owner) {
  // Unlink, then drop the cached descriptor and count the removal, so that no concurrent open
  // caches a descriptor of the removed file; holders of the old one keep it until they let go.
  const std::string path = PathOf(owner);
  const bool removed = ::unlink(path.c_str()) == 0;
  if (!removed && errno != ENOENT) return Errno("cannot remove block file", path);
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++removals_;
    auto it = open_.find(owner);
    if (it != open_.end()) {
      lru_.erase(it->second.lru);
      open_.erase(it);
    }
  }
  return removed && options_.sync ? SyncDir(dir_) : absl::OkStatus();
}

absl::StatusOr<std::vector<uint64_t>> BlockFiles::ListOwners() const {
  DIR* d = ::opendir(dir_.c_str());
  if (d == nullptr) return Errno("cannot list", dir_);
  std::vector<uint64_t> owners;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    const size_t n = sizeof(kSuffix) - 1;
    if (name.size() != 16 + n || name.compare(16, n, kSuffix) != 0) continue;
    uint64_t owner = 0;
    bool hex = true;
    for (int i = 0; i < 16 && hex; ++i) {
      const char c = name[i];
      const int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
      hex = digit >= 0;
      owner = (owner << 4) | static_cast<uint64_t>(digit & 0xf);
    }
    if (hex) owners.push_back(owner);
  }
  ::closedir(d);
  std::sort(owners.begin(), owners.end());
  return owners;
}

}  // namespace kvmem
