// Fashion-MNIST loader for the IDX format (optionally gzip-compressed).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace zipwire::train {

// Where the Debian package `dataset-fashion-mnist` installs the files.
inline constexpr char kDefaultFashionMnistDir[] = "/usr/share/datasets/fashion-mnist";

inline constexpr size_t kImageRows = 28;
inline constexpr size_t kImageCols = 28;
inline constexpr size_t kImagePixels = kImageRows * kImageCols;
inline constexpr size_t kNumClasses = 10;

// Per-pixel statistics of the Fashion-MNIST training set after x/255.
inline constexpr float kFashionMnistMean = 0.2860f;
inline constexpr float kFashionMnistStd = 0.3530f;

enum class Split { kTrain, kTest };

struct Dataset {
  size_t count = 0;
  std::vector<float> images;    // count * kImagePixels, row-major, one image per row
  std::vector<uint8_t> labels;  // count, each < kNumClasses

  const float* image(size_t i) const { return images.data() + i * kImagePixels; }
};

struct LoadOptions {
  // After x/255, also apply (x - mean) / std with the Fashion-MNIST constants.
  bool standardize = true;
};

// Loads `<dir>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`; a file without the .gz suffix is
// used when the compressed one is absent. kNotFound names the path and the Debian package;
// kCorrupt (with the file name) for bad magic, dimensions, sizes, count mismatch or labels >= 10.
Result<Dataset> LoadFashionMnist(const std::string& dir, Split split, const LoadOptions& options = {});

// Same checks for an explicit pair of IDX files (gzip or plain).
Result<Dataset> LoadIdxPair(const std::string& images_path, const std::string& labels_path,
                            const LoadOptions& options = {});

}  // namespace zipwire::train
