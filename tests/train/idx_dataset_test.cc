#include "ps/train/idx_dataset.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace zipwire::train {
namespace {

namespace fs = std::filesystem;

std::vector<uint8_t> Header(uint32_t magic, std::vector<uint32_t> dims) {
  std::vector<uint8_t> out;
  auto put = [&](uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
  };
  put(magic);
  for (uint32_t d : dims) put(d);
  return out;
}

std::vector<uint8_t> ImagesFile(uint32_t count, uint32_t rows = 28, uint32_t cols = 28,
                                uint32_t magic = 0x00000803) {
  std::vector<uint8_t> f = Header(magic, {count, rows, cols});
  for (size_t i = 0; i < size_t{count} * rows * cols; ++i) f.push_back(static_cast<uint8_t>(i * 7));
  return f;
}

std::vector<uint8_t> LabelsFile(uint32_t count, uint32_t magic = 0x00000801) {
  std::vector<uint8_t> f = Header(magic, {count});
  for (uint32_t i = 0; i < count; ++i) f.push_back(static_cast<uint8_t>(i % 10));
  return f;
}

class IdxFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("zipwire_idx_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string Write(const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return path;
  }
  std::string WriteGz(const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string path = (dir_ / name).string();
    gzFile f = gzopen(path.c_str(), "wb");
    EXPECT_NE(f, nullptr);
    EXPECT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
    gzclose(f);
    return path;
  }
  // Writes a valid pair under the Fashion-MNIST test-split names.
  void WriteTestSplit(uint32_t n) {
    WriteGz("t10k-images-idx3-ubyte.gz", ImagesFile(n));
    WriteGz("t10k-labels-idx1-ubyte.gz", LabelsFile(n));
  }
  fs::path dir_;
};

TEST_F(IdxFilesTest, LoadsValidGzipPairAndNormalises) {
  WriteTestSplit(5);
  auto raw = LoadFashionMnist(dir_.string(), Split::kTest, LoadOptions{.standardize = false});
  ASSERT_TRUE(raw.ok()) << raw.status().ToString();
  EXPECT_EQ(raw->count, 5u);
  ASSERT_EQ(raw->images.size(), 5 * kImagePixels);
  EXPECT_FLOAT_EQ(raw->images[1], 7.0f / 255.0f);
  EXPECT_EQ(raw->labels, (std::vector<uint8_t>{0, 1, 2, 3, 4}));

  auto std_ds = LoadFashionMnist(dir_.string(), Split::kTest);
  ASSERT_TRUE(std_ds.ok()) << std_ds.status().ToString();
  EXPECT_NEAR(std_ds->images[1], (7.0f / 255.0f - kFashionMnistMean) / kFashionMnistStd, 1e-6);
}

TEST_F(IdxFilesTest, ReadsUncompressedFilesToo) {
  Write("t10k-images-idx3-ubyte", ImagesFile(3));
  Write("t10k-labels-idx1-ubyte", LabelsFile(3));
  auto ds = LoadFashionMnist(dir_.string(), Split::kTest);
  ASSERT_TRUE(ds.ok()) << ds.status().ToString();
  EXPECT_EQ(ds->count, 3u);
}

TEST_F(IdxFilesTest, WrongMagicIsCorrupt) {
  const std::string img = Write("img", ImagesFile(2, 28, 28, 0x00000801));
  const std::string lbl = Write("lbl", LabelsFile(2));
  auto ds = LoadIdxPair(img, lbl);
  ASSERT_FALSE(ds.ok());
  EXPECT_EQ(ds.status().code(), StatusCode::kCorrupt);
  EXPECT_NE(ds.status().message().find(img), std::string::npos) << ds.status().ToString();
  EXPECT_NE(ds.status().message().find("magic"), std::string::npos);

  const std::string img_ok = Write("img_ok", ImagesFile(2));
  const std::string lbl_bad = Write("lbl_bad", LabelsFile(2, 0x00000803));
  auto ds2 = LoadIdxPair(img_ok, lbl_bad);
  ASSERT_FALSE(ds2.ok());
  EXPECT_EQ(ds2.status().code(), StatusCode::kCorrupt);
  EXPECT_NE(ds2.status().message().find(lbl_bad), std::string::npos) << ds2.status().ToString();
}

TEST_F(IdxFilesTest, WrongDimensionsAreCorrupt) {
  const std::string img = Write("img", ImagesFile(2, 32, 32));
  const std::string lbl = Write("lbl", LabelsFile(2));
  auto ds = LoadIdxPair(img, lbl);
  ASSERT_FALSE(ds.ok());
  EXPECT_EQ(ds.status().code(), StatusCode::kCorrupt);
  EXPECT_NE(ds.status().message().find("28x28"), std::string::npos) << ds.status().ToString();
}

TEST_F(IdxFilesTest, TruncatedFileIsCorrupt) {
  std::vector<uint8_t> bytes = ImagesFile(3);
  bytes.resize(bytes.size() - 1);
  const std::string img = Write("img", bytes);
  const std::string lbl = Write("lbl", LabelsFile(3));
  auto ds = LoadIdxPair(img, lbl);
  ASSERT_FALSE(ds.ok());
  EXPECT_EQ(ds.status().code(), StatusCode::kCorrupt);
  EXPECT_NE(ds.status().message().find(img), std::string::npos) << ds.status().ToString();
  EXPECT_NE(ds.status().message().find("truncated"), std::string::npos);

  // Shorter than even the header.
  const std::string tiny = Write("tiny", {0, 0, 8});
  auto ds2 = LoadIdxPair(img, tiny);
  ASSERT_FALSE(ds2.ok());
  EXPECT_EQ(ds2.status().code(), StatusCode::kCorrupt);
}

TEST_F(IdxFilesTest, TruncatedGzipStreamIsCorrupt) {
  const std::string full = WriteGz("full.gz", ImagesFile(20));
  std::vector<uint8_t> gz(fs::file_size(full));
  std::ifstream(full, std::ios::binary).read(reinterpret_cast<char*>(gz.data()), gz.size());
  gz.resize(gz.size() / 2);
  const std::string img = Write("half.gz", gz);
  const std::string lbl = Write("lbl", LabelsFile(20));
  auto ds = LoadIdxPair(img, lbl);
  ASSERT_FALSE(ds.ok());
  EXPECT_EQ(ds.status().code(), StatusCode::kCorrupt);
  EXPECT_NE(ds.status().message().find(img), std::string::npos) << ds.status().ToString();
}

TEST_F(IdxFilesTest, TrailingByteIsCorrupt) {
  std::vector<uint8_t> bytes = LabelsFile(3);
  bytes.push_back(0);
  const std::string img = Write("img", ImagesFile(3));
  const std::string lbl = Write("lbl", bytes);
  auto ds = LoadIdxPair(img, lbl);
  ASSERT_FALSE(ds.ok());
  EXPECT_EQ(ds.status().code(), StatusCode::kCorrupt);
  EXPECT_NE(ds.status().message().find(lbl), std::string::npos) << ds.status().ToString();
  EXPECT_NE(ds.status().message().find("trailing"), std::string::npos);
}

TEST_F(IdxFilesTest, CountMismatchIsCorrupt) {
  const std::string img = Write("img", ImagesFile(4));
  const std::string lbl = Write("lbl", LabelsFile(3));
  auto ds = LoadIdxPair(img, lbl);
  ASSERT_FALSE(ds.ok());
  EXPECT_EQ(ds.status().code(), StatusCode::kCorrupt);
  EXPECT_NE(ds.status().message().find("4 images"), std::string::npos) << ds.status().ToString();
  EXPECT_NE(ds.status().message().find("3 labels"), std::string::npos);
}

TEST_F(IdxFilesTest, LabelOutOfRangeIsCorrupt) {
  std::vector<uint8_t> bytes = LabelsFile(3);
  bytes.back() = 10;
  const std::string img = Write("img", ImagesFile(3));
  const std::string lbl = Write("lbl", bytes);
  auto ds = LoadIdxPair(img, lbl);
  ASSERT_FALSE(ds.ok());
  EXPECT_EQ(ds.status().code(), StatusCode::kCorrupt);
  EXPECT_NE(ds.status().message().find(lbl), std::string::npos) << ds.status().ToString();
  EXPECT_NE(ds.status().message().find("label 10"), std::string::npos);
}

TEST_F(IdxFilesTest, MissingFileNamesPathAndPackage) {
  auto ds = LoadFashionMnist(dir_.string(), Split::kTrain);
  ASSERT_FALSE(ds.ok());
  EXPECT_EQ(ds.status().code(), StatusCode::kNotFound);
  const std::string& msg = ds.status().message();
  EXPECT_NE(msg.find((dir_ / "train-images-idx3-ubyte.gz").string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("dataset-fashion-mnist"), std::string::npos) << msg;

  // Images present, labels missing: the message names the labels file.
  WriteGz("t10k-images-idx3-ubyte.gz", ImagesFile(2));
  auto ds2 = LoadFashionMnist(dir_.string(), Split::kTest);
  ASSERT_FALSE(ds2.ok());
  EXPECT_EQ(ds2.status().code(), StatusCode::kNotFound);
  EXPECT_NE(ds2.status().message().find("t10k-labels-idx1-ubyte.gz"), std::string::npos);
}

bool RealDataPresent() {
  return fs::exists(std::string(kDefaultFashionMnistDir) + "/train-images-idx3-ubyte.gz");
}

TEST(FashionMnistRealTest, LoadsBothSplits) {
  if (!RealDataPresent()) {
    GTEST_SKIP() << "Fashion-MNIST not installed at " << kDefaultFashionMnistDir
                 << "; install the Debian package dataset-fashion-mnist (scripts/install-deps.sh)";
  }
  auto train = LoadFashionMnist(kDefaultFashionMnistDir, Split::kTrain);
  ASSERT_TRUE(train.ok()) << train.status().ToString();
  auto test = LoadFashionMnist(kDefaultFashionMnistDir, Split::kTest);
  ASSERT_TRUE(test.ok()) << test.status().ToString();
  EXPECT_EQ(train->count, 60000u);
  EXPECT_EQ(test->count, 10000u);
  EXPECT_EQ(train->images.size(), 60000 * kImagePixels);
  EXPECT_EQ(test->labels.size(), 10000u);
  std::vector<size_t> per_class(kNumClasses, 0);
  for (uint8_t l : train->labels) {
    ASSERT_LT(l, kNumClasses);
    ++per_class[l];
  }
  for (size_t c : per_class) EXPECT_EQ(c, 6000u);  // Fashion-MNIST is balanced
  // The standardisation constants come from this data: mean ~0, std ~1.
  double sum = 0, sq = 0;
  for (float v : train->images) {
    sum += v;
    sq += double{v} * v;
  }
  const double mean = sum / train->images.size();
  EXPECT_NEAR(mean, 0.0, 0.01);
  EXPECT_NEAR(std::sqrt(sq / train->images.size() - mean * mean), 1.0, 0.01);
}

}  // namespace
}  // namespace zipwire::train
