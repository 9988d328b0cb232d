// tools/myelin-train/model.hpp — the synthetic model myelin-train trains.
//
// A multi-layer perceptron with ReLU hidden layers and a softmax cross-entropy head, trained on
// data generated from a fixed "teacher" MLP so the task is learnable and the loss falls. All
// parameters live in one flat float vector (what the communication layer moves); the layout is
// [W0 (out0 x in), b0 (out0), W1, b1, ...]. Everything is deterministic for a given seed: the
// same seed gives bit-identical data, initial parameters and gradients on every rank and in the
// serial reference.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace myelin::train {

struct ModelShape {
  size_t inputs = 64;
  std::vector<size_t> hidden = {256, 256};
  size_t classes = 10;
  // Number of parameters for this shape.
  [[nodiscard]] size_t parameter_count() const;
};

// The shape whose parameter count is closest to `target` with `layers` hidden layers of equal
// width (at least 4 wide), 64 inputs and 10 classes.
ModelShape shape_for_parameters(size_t target, size_t layers);

// A batch of samples: inputs row-major (count x inputs), labels in [0, classes).
struct Batch {
  size_t count = 0;
  std::vector<float> inputs;
  std::vector<int32_t> labels;
};

// Deterministic data: sample i of step s is the same on every rank, so ranks can take disjoint
// shards of one global batch.
class Dataset {
 public:
  Dataset(const ModelShape& shape, uint64_t seed);
  // Samples [first, first + count) of the global batch of `step`.
  [[nodiscard]] Batch batch(uint64_t step, size_t first, size_t count) const;

 private:
  ModelShape shape_;
  uint64_t seed_;
  std::vector<float> teacher_;  // a random MLP (same shape) whose argmax labels the inputs
};

class Mlp {
 public:
  explicit Mlp(ModelShape shape);
  [[nodiscard]] const ModelShape& shape() const noexcept { return shape_; }
  [[nodiscard]] size_t parameter_count() const noexcept { return count_; }

  // He-initialised parameters from the seed.
  [[nodiscard]] std::vector<float> initial_parameters(uint64_t seed) const;
  // Mean cross-entropy loss over the batch, and (when grad is not empty) the gradient of the SUM of
  // per-sample losses divided by `normaliser` written into grad (overwritten, not accumulated).
  double loss_and_gradient(std::span<const float> params, const Batch& batch, std::span<float> grad,
                           double normaliser) const;
  // The class the model predicts for one input row.
  [[nodiscard]] size_t predict(std::span<const float> params, const float* x) const;
  // Fraction of the batch classified correctly.
  [[nodiscard]] double accuracy(std::span<const float> params, const Batch& batch) const;

 private:
  void forward(std::span<const float> params, const float* x,
               std::vector<std::vector<float>>& acts) const;
  ModelShape shape_;
  std::vector<size_t> widths_;  // inputs, hidden..., classes
  size_t count_;
};

}  // namespace myelin::train
