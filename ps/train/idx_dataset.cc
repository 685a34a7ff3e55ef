#include "ps/train/idx_dataset.h"

#include <sys/stat.h>
#include <zlib.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace zipwire::train {
namespace {

constexpr uint32_t kImagesMagic = 0x00000803;  // unsigned byte, 3 dimensions
constexpr uint32_t kLabelsMagic = 0x00000801;  // unsigned byte, 1 dimension
// Far above the real 47 MB train images; bounds memory if a file is garbage.
constexpr size_t kMaxFileBytes = size_t{512} << 20;

std::string MissingMessage(const std::string& path) {
  return "Fashion-MNIST file " + path +
         " not found; install the Debian package dataset-fashion-mnist "
         "(scripts/install-deps.sh or `apt-get install dataset-fashion-mnist`) or point the data "
         "directory (ZIPWIRE_DATA_DIR / --data-dir) at a copy of the files";
}

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// Reads the whole (decompressed) file; gzread passes plain files through unchanged.
Result<std::vector<uint8_t>> ReadAll(const std::string& path) {
  if (!FileExists(path)) return NotFound(MissingMessage(path));
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) {
    return IoError("cannot open " + path + ": " + std::strerror(errno));
  }
  std::vector<uint8_t> data;
  constexpr size_t kChunk = size_t{1} << 20;
  for (;;) {
    if (data.size() >= kMaxFileBytes) {
      gzclose(f);
      return Corrupt(path + ": larger than " + std::to_string(kMaxFileBytes) + " bytes decompressed");
    }
    const size_t old = data.size();
    data.resize(old + kChunk);
    const int n = gzread(f, data.data() + old, static_cast<unsigned>(kChunk));
    if (n < 0) {
      int errnum = 0;
      std::string msg = gzerror(f, &errnum);
      gzclose(f);
      return Corrupt(path + ": read failed: " + msg);
    }
    data.resize(old + static_cast<size_t>(n));
    if (n == 0) break;
  }
  // A gzip stream cut short reads as a clean EOF with a pending error.
  int errnum = Z_OK;
  const char* msg = gzerror(f, &errnum);
  std::string err = (errnum != Z_OK && msg != nullptr) ? msg : "";
  gzclose(f);
  if (errnum != Z_OK) return Corrupt(path + ": truncated or damaged gzip stream: " + err);
  return data;
}

uint32_t BigEndian32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

std::string Hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

// Validates an images file and returns its image count.
Result<size_t> CheckImages(const std::string& path, const std::vector<uint8_t>& d) {
  if (d.size() < 16)
    return Corrupt(path + ": " + std::to_string(d.size()) + " bytes, shorter than the IDX header");
  const uint32_t magic = BigEndian32(d.data());
  if (magic != kImagesMagic) {
    return Corrupt(path + ": bad magic " + Hex32(magic) + ", expected 0x00000803 (images)");
  }
  const size_t count = BigEndian32(d.data() + 4);
  const size_t rows = BigEndian32(d.data() + 8);
  const size_t cols = BigEndian32(d.data() + 12);
  if (rows != kImageRows || cols != kImageCols) {
    return Corrupt(path + ": images are " + std::to_string(rows) + "x" + std::to_string(cols) +
                   ", expected 28x28");
  }
  const size_t expected = 16 + count * kImagePixels;
  if (d.size() != expected) {
    return Corrupt(path + ": " + std::to_string(d.size()) + " bytes, expected exactly " +
                   std::to_string(expected) + " for " + std::to_string(count) + " images (" +
                   (d.size() < expected ? "truncated" : "trailing bytes") + ")");
  }
  return count;
}

Result<size_t> CheckLabels(const std::string& path, const std::vector<uint8_t>& d) {
  if (d.size() < 8)
    return Corrupt(path + ": " + std::to_string(d.size()) + " bytes, shorter than the IDX header");
  const uint32_t magic = BigEndian32(d.data());
  if (magic != kLabelsMagic) {
    return Corrupt(path + ": bad magic " + Hex32(magic) + ", expected 0x00000801 (labels)");
  }
  const size_t count = BigEndian32(d.data() + 4);
  const size_t expected = 8 + count;
  if (d.size() != expected) {
    return Corrupt(path + ": " + std::to_string(d.size()) + " bytes, expected exactly " +
                   std::to_string(expected) + " for " + std::to_string(count) + " labels (" +
                   (d.size() < expected ? "truncated" : "trailing bytes") + ")");
  }
  for (size_t i = 0; i < count; ++i) {
    if (d[8 + i] >= kNumClasses) {
      return Corrupt(path + ": label " + std::to_string(d[8 + i]) + " at index " + std::to_string(i) +
                     " is not below " + std::to_string(kNumClasses));
    }
  }
  return count;
}

// Prefers `<name>.gz`, falls back to the uncompressed name; reports the .gz path when neither exists.
std::string ResolvePath(const std::string& dir, const std::string& stem) {
  const std::string base = dir.empty() ? stem : (dir.back() == '/' ? dir + stem : dir + "/" + stem);
  const std::string gz = base + ".gz";
  if (!FileExists(gz) && FileExists(base)) return base;
  return gz;
}

}  // namespace

Result<Dataset> LoadIdxPair(const std::string& images_path, const std::string& labels_path,
                            const LoadOptions& options) {
  ZW_ASSIGN_OR_RETURN(std::vector<uint8_t> image_bytes, ReadAll(images_path));
  ZW_ASSIGN_OR_RETURN(std::vector<uint8_t> label_bytes, ReadAll(labels_path));
  ZW_ASSIGN_OR_RETURN(size_t n_images, CheckImages(images_path, image_bytes));
  ZW_ASSIGN_OR_RETURN(size_t n_labels, CheckLabels(labels_path, label_bytes));
  if (n_images != n_labels) {
    return Corrupt(images_path + " holds " + std::to_string(n_images) + " images but " + labels_path +
                   " holds " + std::to_string(n_labels) + " labels");
  }
  Dataset ds;
  ds.count = n_images;
  ds.images.resize(n_images * kImagePixels);
  const float mean = options.standardize ? kFashionMnistMean : 0.0f;
  const float inv_std = options.standardize ? 1.0f / kFashionMnistStd : 1.0f;
  const uint8_t* px = image_bytes.data() + 16;
  for (size_t i = 0; i < ds.images.size(); ++i) {
    ds.images[i] = (static_cast<float>(px[i]) / 255.0f - mean) * inv_std;
  }
  ds.labels.assign(label_bytes.begin() + 8, label_bytes.end());
  return ds;
}

Result<Dataset> LoadFashionMnist(const std::string& dir, Split split, const LoadOptions& options) {
  const char* prefix = split == Split::kTrain ? "train" : "t10k";
  const std::string images = ResolvePath(dir, std::string(prefix) + "-images-idx3-ubyte");
  const std::string labels = ResolvePath(dir, std::string(prefix) + "-labels-idx1-ubyte");
  return LoadIdxPair(images, labels, options);
}

}  // namespace zipwire::train
