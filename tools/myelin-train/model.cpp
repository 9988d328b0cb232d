// The synthetic MLP: plain loops, written for determinism first (fixed summation order), since the
// serial reference must reproduce the distributed run bit for bit.
#include "model.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace myelin::train {
namespace {

// SplitMix64: a small, well-mixed, stateless-per-call generator; deterministic across platforms.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1) from a counter.
float uniform(uint64_t seed, uint64_t index) {
  const uint64_t bits = mix(seed ^ mix(index));
  return static_cast<float>(static_cast<double>(bits >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

std::vector<size_t> widths_of(const ModelShape& s) {
  std::vector<size_t> w{s.inputs};
  w.insert(w.end(), s.hidden.begin(), s.hidden.end());
  w.push_back(s.classes);
  return w;
}

}  // namespace

size_t ModelShape::parameter_count() const {
  const auto w = widths_of(*this);
  size_t n = 0;
  for (size_t l = 0; l + 1 < w.size(); ++l) n += w[l + 1] * w[l] + w[l + 1];
  return n;
}

ModelShape shape_for_parameters(size_t target, size_t layers) {
  ModelShape best;
  best.hidden.assign(std::max<size_t>(layers, 1), 4);
  size_t lo = 4, hi = 1 << 16;
  while (lo < hi) {  // largest width whose count does not exceed the target
    const size_t mid = (lo + hi + 1) / 2;
    ModelShape s = best;
    s.hidden.assign(s.hidden.size(), mid);
    if (s.parameter_count() <= target)
      lo = mid;
    else
      hi = mid - 1;
  }
  best.hidden.assign(best.hidden.size(), lo);
  return best;
}

Dataset::Dataset(const ModelShape& shape, uint64_t seed) : shape_(shape), seed_(seed) {
  Mlp teacher(shape);
  teacher_ = teacher.initial_parameters(seed ^ 0x7eac4e5ULL);
}

Batch Dataset::batch(uint64_t step, size_t first, size_t count) const {
  Batch b;
  b.count = count;
  b.inputs.resize(count * shape_.inputs);
  b.labels.resize(count);
  const uint64_t step_seed = mix(seed_ ^ (step * 0x632be59bd9b4e019ULL));
  for (size_t i = 0; i < count; ++i) {
    for (size_t j = 0; j < shape_.inputs; ++j) {
      b.inputs[i * shape_.inputs + j] = uniform(step_seed, (first + i) * shape_.inputs + j) * 2.0f;
    }
  }
  // Label by the teacher's argmax: a learnable, deterministic target.
  const Mlp teacher(shape_);
  for (size_t i = 0; i < count; ++i) {
    b.labels[i] = static_cast<int32_t>(teacher.predict(teacher_, &b.inputs[i * shape_.inputs]));
  }
  return b;
}

Mlp::Mlp(ModelShape shape) : shape_(std::move(shape)), widths_(widths_of(shape_)) {
  count_ = shape_.parameter_count();
}

std::vector<float> Mlp::initial_parameters(uint64_t seed) const {
  std::vector<float> p(count_, 0.0f);
  size_t off = 0;
  for (size_t l = 0; l + 1 < widths_.size(); ++l) {
    const size_t in = widths_[l], out = widths_[l + 1];
    const float scale = std::sqrt(6.0f / static_cast<float>(in));  // He-uniform
    for (size_t i = 0; i < out * in; ++i) p[off + i] = uniform(seed + l, i) * scale;
    off += out * in + out;  // biases start at zero
  }
  return p;
}

void Mlp::forward(std::span<const float> params, const float* x,
                  std::vector<std::vector<float>>& acts) const {
  acts.resize(widths_.size());
  acts[0].assign(x, x + widths_[0]);
  size_t off = 0;
  for (size_t l = 0; l + 1 < widths_.size(); ++l) {
    const size_t in = widths_[l], out = widths_[l + 1];
    const float* w = params.data() + off;
    const float* b = w + out * in;
    auto& y = acts[l + 1];
    y.assign(out, 0.0f);
    const float* a = acts[l].data();
    for (size_t o = 0; o < out; ++o) {
      float acc = b[o];
      const float* row = w + o * in;
      for (size_t k = 0; k < in; ++k) acc += row[k] * a[k];
      y[o] = (l + 2 < widths_.size()) ? std::max(acc, 0.0f) : acc;
    }
    off += out * in + out;
  }
}

double Mlp::loss_and_gradient(std::span<const float> params, const Batch& batch,
                              std::span<float> grad, double normaliser) const {
  const bool want_grad = !grad.empty();
  if (want_grad) std::fill(grad.begin(), grad.end(), 0.0f);
  std::vector<std::vector<float>> acts;
  std::vector<float> delta, prev_delta;
  double loss = 0.0;
  const float inv_norm = static_cast<float>(1.0 / normaliser);
  for (size_t s = 0; s < batch.count; ++s) {
    forward(params, batch.inputs.data() + s * widths_[0], acts);
    const auto& logits = acts.back();
    const float mx = *std::max_element(logits.begin(), logits.end());
    double z = 0.0;
    for (float v : logits) z += std::exp(static_cast<double>(v - mx));
    const int32_t label = batch.labels[s];
    loss += -(static_cast<double>(logits[static_cast<size_t>(label)] - mx) - std::log(z));
    if (!want_grad) continue;
    // dL/dlogits = softmax - onehot
    delta.resize(logits.size());
    for (size_t c = 0; c < logits.size(); ++c) {
      const double p = std::exp(static_cast<double>(logits[c] - mx)) / z;
      delta[c] = static_cast<float>(p - (static_cast<int32_t>(c) == label ? 1.0 : 0.0));
    }
    // Backward through the layers, last to first.
    size_t off = count_;
    for (size_t l = widths_.size() - 1; l >= 1; --l) {
      const size_t in = widths_[l - 1], out = widths_[l];
      off -= out * in + out;
      float* gw = grad.data() + off;
      float* gb = gw + out * in;
      const float* a = acts[l - 1].data();
      for (size_t o = 0; o < out; ++o) {
        const float d = delta[o] * inv_norm;
        gb[o] += d;
        float* grow = gw + o * in;
        for (size_t k = 0; k < in; ++k) grow[k] += d * a[k];
      }
      if (l == 1) break;
      prev_delta.assign(in, 0.0f);
      const float* w = params.data() + off;
      for (size_t o = 0; o < out; ++o) {
        const float* row = w + o * in;
        for (size_t k = 0; k < in; ++k) prev_delta[k] += row[k] * delta[o];
      }
      for (size_t k = 0; k < in; ++k) {
        if (acts[l - 1][k] <= 0.0f) prev_delta[k] = 0.0f;  // ReLU
      }
      delta.swap(prev_delta);
    }
  }
  return batch.count ? loss / static_cast<double>(batch.count) : 0.0;
}

size_t Mlp::predict(std::span<const float> params, const float* x) const {
  std::vector<std::vector<float>> acts;
  forward(params, x, acts);
  const auto& y = acts.back();
  return static_cast<size_t>(std::max_element(y.begin(), y.end()) - y.begin());
}

double Mlp::accuracy(std::span<const float> params, const Batch& batch) const {
  size_t right = 0;
  for (size_t s = 0; s < batch.count; ++s) {
    right += predict(params, batch.inputs.data() + s * widths_[0]) ==
             static_cast<size_t>(batch.labels[s]);
  }
  return batch.count ? static_cast<double>(right) / static_cast<double>(batch.count) : 0.0;
}

}  // namespace myelin::train
