// Weight and bias initializers, drawn from the counter-based generator in double
// precision (float32 chains round the same draws).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gradchain/common.hpp"
#include "gradchain/rng.hpp"

namespace gradchain {

enum class InitKind {
  xavier_normal,
  xavier_uniform,
  he_normal,
  he_uniform,
  lecun_normal,
  orthogonal,
  normal
};

struct InitSpec {
  InitKind kind = InitKind::xavier_normal;
  double gain = 1.0;
  double sigma_w = 1.0;  // `normal`: weight std sigma_w / sqrt(fan_in)
  double bias_std = 0.0;

  static InitKind parse_kind(const std::string& name);
  static const std::vector<std::string>& names();
  void validate() const;
  // The weight standard deviation for a layer (orthogonal: 1/sqrt(fan_in) times gain, the
  // std of one entry of a Haar matrix when fan_out >= fan_in).
  double weight_std(int fan_out, int fan_in) const;
};

// Streams of the generator: layer l's weights and biases never share random numbers.
inline std::uint64_t weight_stream(std::uint64_t layer) {
  return layer * 2;
}
inline std::uint64_t bias_stream(std::uint64_t layer) {
  return layer * 2 + 1;
}

// Writes the row-major fan_out x fan_in weight of layer `layer` (0-based), polling `cancel`
// (if given) as it goes: one layer of a wide chain takes seconds.
void init_weight(double* w, int fan_out, int fan_in, const InitSpec& spec, const Philox& rng,
                 std::uint64_t layer, Canceller* cancel = nullptr);
// Writes the n biases of layer `layer`: zero, or N(0, bias_std^2).
void init_bias(double* b, int n, const InitSpec& spec, const Philox& rng, std::uint64_t layer);

// A weight is its unit draws times one factor: N(0, 1) entries for the normal
// initializers, U(-1, 1) for the uniform ones, a Haar-orthogonal matrix (signs folded in)
// for orthogonal. Initializers of one family draw the same units from the same seed, so a
// chain redrawn with another gain, sigma_w or bias_std may keep its units and rescale them:
// unit * scale is bit for bit the weight init_weight writes.
enum class UnitFamily { normal, uniform, orthogonal };
UnitFamily unit_family(InitKind kind);
double weight_scale(int fan_out, int fan_in, const InitSpec& spec);
void init_weight_unit(double* w, int fan_out, int fan_in, UnitFamily family, const Philox& rng,
                      std::uint64_t layer, Canceller* cancel = nullptr);
// The biases' units: N(0, 1), scaled by bias_std.
void init_bias_unit(double* b, int n, const Philox& rng, std::uint64_t layer);
// out[i] = unit[i] * scale (out may be unit).
void scale_draws(const double* unit, double scale, double* out, std::uint64_t n);

}  // namespace gradchain
