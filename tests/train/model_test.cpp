// The synthetic model myelin-train uses: gradients match finite differences, everything is
// deterministic, and plain SGD on it lowers the loss.
#include "model.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace myelin::train {
namespace {

ModelShape small_shape() {
  ModelShape s;
  s.inputs = 6;
  s.hidden = {5, 4};
  s.classes = 3;
  return s;
}

TEST(Model, ParameterCountAndShapeForTarget) {
  EXPECT_EQ(small_shape().parameter_count(), 5u * 6 + 5 + 4 * 5 + 4 + 3 * 4 + 3);
  const ModelShape s = shape_for_parameters(1'000'000, 2);
  EXPECT_LE(s.parameter_count(), 1'000'000u);
  ModelShape wider = s;
  wider.hidden.assign(2, s.hidden[0] + 1);
  EXPECT_GT(wider.parameter_count(), 1'000'000u);
}

TEST(Model, GradientMatchesFiniteDifferences) {
  const Mlp mlp(small_shape());
  const Dataset data(small_shape(), 7);
  const Batch batch = data.batch(0, 0, 4);
  std::vector<float> p = mlp.initial_parameters(3);
  for (size_t i = 0; i < p.size(); ++i) p[i] += 0.01f * static_cast<float>(i % 7);  // biases too
  std::vector<float> grad(p.size());
  mlp.loss_and_gradient(p, batch, grad, static_cast<double>(batch.count));
  const float h = 1e-2f;
  int checked = 0;
  for (size_t i = 0; i < p.size(); i += 3) {
    std::vector<float> plus = p, minus = p;
    plus[i] += h;
    minus[i] -= h;
    const double lp = mlp.loss_and_gradient(plus, batch, {}, 1.0);
    const double lm = mlp.loss_and_gradient(minus, batch, {}, 1.0);
    const double numeric = (lp - lm) / (2.0 * h);
    EXPECT_NEAR(grad[i], numeric, 2e-3 + 2e-2 * std::fabs(numeric)) << "parameter " << i;
    ++checked;
  }
  EXPECT_GT(checked, 20);
}

TEST(Model, DataAndInitAreDeterministicAndShardable) {
  const Dataset a(small_shape(), 11), b(small_shape(), 11);
  const Batch whole = a.batch(5, 0, 8);
  const Batch first = b.batch(5, 0, 4), second = b.batch(5, 4, 4);
  for (size_t i = 0; i < 4 * 6; ++i) EXPECT_EQ(whole.inputs[i], first.inputs[i]);
  for (size_t i = 0; i < 4 * 6; ++i) EXPECT_EQ(whole.inputs[24 + i], second.inputs[i]);
  EXPECT_EQ(whole.labels[5], second.labels[1]);
  const Mlp mlp(small_shape());
  EXPECT_EQ(mlp.initial_parameters(1), mlp.initial_parameters(1));
  EXPECT_NE(mlp.initial_parameters(1), mlp.initial_parameters(2));
}

TEST(Model, SgdLowersTheLoss) {
  ModelShape shape;
  shape.inputs = 16;
  shape.hidden = {32};
  shape.classes = 4;
  const Mlp mlp(shape);
  const Dataset data(shape, 5);
  std::vector<float> p = mlp.initial_parameters(9);
  std::vector<float> grad(p.size());
  const Batch eval = data.batch(1'000'000, 0, 256);
  const double before = mlp.loss_and_gradient(p, eval, {}, 1.0);
  for (uint64_t step = 0; step < 200; ++step) {
    const Batch b = data.batch(step, 0, 32);
    mlp.loss_and_gradient(p, b, grad, 32.0);
    for (size_t i = 0; i < p.size(); ++i) p[i] -= 0.1f * grad[i];
  }
  const double after = mlp.loss_and_gradient(p, eval, {}, 1.0);
  EXPECT_LT(after, 0.7 * before) << "before " << before << " after " << after;
}

}  // namespace
}  // namespace myelin::train
