#include "gradchain/chain.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>

#include "gradchain/blas.hpp"
#include "gradchain/buffer.hpp"
#include "gradchain/linear.hpp"
#include "gradchain/parallel.hpp"
#include "gradchain/residual.hpp"
#include "gradchain/rng.hpp"
#include "gradchain/scaled.hpp"
#include "gradchain/small_gemm.hpp"
#include "gradchain/system.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gradchain {

namespace {
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Workspaces up to this size stay with the chain between passes (saves page faults).
constexpr double kKeptWorkspaceBytes = 512.0 * 1024 * 1024;
// Below this many multiply-adds in a whole pass, waking a second thread costs more than
// it saves.
constexpr double kOwnThreadsWork = 1 << 16;
// A pass over less data than this (about a core's L2 cache) does not prefetch.
constexpr double kCachedBytes = 1 << 20;
// Forward products of fewer multiply-adds than this do not prefetch (measured: they lose).
constexpr double kPrefetchWork = 1 << 15;
// Below this many multiply-adds per GEMM, OpenBLAS threads cost more than they save.
constexpr double kThreadedGemmWork = 1 << 20;

int clamp_exp(std::int64_t k) {
  return static_cast<int>(std::clamp<std::int64_t>(k, -100000, 100000));
}

}  // namespace

template <class T>
struct Chain<T>::Workspace {
  Buffer<T> h, s, g, dy, pg, pg2, ck, dr;
  std::vector<std::vector<T>> param_grads;  // handed back by recycle_param_grads
  double bytes() const {
    return h.bytes() + s.bytes() + g.bytes() + dy.bytes() + pg.bytes() + pg2.bytes() + ck.bytes() +
           dr.bytes();
  }
};

// ---- the plan: the block tree as a flat list of steps over numbered boundaries ----------

namespace {

template <class T>
struct Compiler {
  using Step = typename Chain<T>::Step;
  std::vector<Step>& steps;
  std::vector<int>& width;
  int param_index = 0;
  int top_block = 0;

  int boundary(int w) {
    width.push_back(w);
    return static_cast<int>(width.size()) - 1;
  }

  int trainable(const Block<T>& b) {
    int n = 0;
    for (const ParamInfo& p : b.params()) n += p.buffer ? 0 : 1;
    return n;
  }

  // Trainable parameters of a block and everything inside it.
  int trainable_in(const Block<T>& b) {
    const auto* r = dynamic_cast<const Residual<T>*>(&b);
    if (!r) return trainable(b);
    int n = r->shortcut() ? trainable(*r->shortcut()) : 0;
    for (const auto& c : r->body()) n += trainable_in(*c);
    return n;
  }

  int leaf(Block<T>* b, int in, const std::string& where) {
    Step s;
    s.block = b;
    s.in = in;
    s.out = boundary(b->out_width());
    s.param0 = param_index;
    s.nparams = trainable(*b);
    param_index += s.nparams;
    s.top_block = top_block;
    s.where_in = where;
    const int out = s.out;
    steps.push_back(std::move(s));
    return out;
  }

  int subtree_params(const Block<T>& b) {
    const auto* r = dynamic_cast<const Residual<T>*>(&b);
    if (!r) return trainable(b);
    int n = r->shortcut() ? trainable(*r->shortcut()) : 0;
    for (const auto& c : r->body()) n += subtree_params(*c);
    return n;
  }

  int block(Block<T>* b, int in, const std::string& where) {
    auto* r = dynamic_cast<Residual<T>*>(b);
    if (!r) return leaf(b, in, where);
    int skip = in;
    int after_shortcut = -1;
    if (r->shortcut()) {
      // The shortcut runs first (its output must live through the body anyway), but its
      // parameters follow the body's, as in parameters() and torch's named_parameters().
      const int first = param_index;
      for (const auto& c : r->body()) param_index += subtree_params(*c);
      skip = leaf(r->shortcut(), in, where + " shortcut");
      after_shortcut = param_index;
      param_index = first;
    }
    int cur = in;
    for (std::size_t j = 0; j < r->body().size(); ++j)
      cur = block(r->body()[j].get(), cur, where + " body block " + std::to_string(j));
    if (after_shortcut >= 0) param_index = after_shortcut;
    Step s;
    s.kind = Step::Kind::join;
    s.block = b;
    s.in = cur;
    s.skip = skip;
    s.rin = in;
    s.out = boundary(b->out_width());
    s.param0 = param_index;
    s.top_block = top_block;
    s.where_in = where;
    const int out = s.out;
    steps.push_back(std::move(s));
    return out;
  }
};

template <class T>
void name_tree(Block<T>& b, const std::string& name, std::vector<ParamRef<T>>& params) {
  if (b.name().empty()) b.set_name(name);
  if (auto* r = dynamic_cast<Residual<T>*>(&b)) {
    for (std::size_t j = 0; j < r->body().size(); ++j)
      name_tree(*r->body()[j], b.name() + ".block." + std::to_string(j), params);
    if (r->shortcut()) name_tree(*r->shortcut(), b.name() + ".shortcut", params);
    return;
  }
  const auto infos = b.params();
  for (std::size_t i = 0; i < infos.size(); ++i) {
    ParamRef<T> p;
    p.name = b.name() + "." + infos[i].name;
    p.shape = infos[i].shape;
    p.block = &b;
    p.index = i;
    p.buffer = infos[i].buffer;
    p.size = 1;
    for (std::int64_t d : p.shape) p.size *= static_cast<std::size_t>(d);
    params.push_back(p);
  }
}

}  // namespace

template <class T>
Chain<T>::Chain(std::vector<std::unique_ptr<Block<T>>> blocks) : blocks_(std::move(blocks)) {
  compile();
}

template <class T>
Chain<T>::Chain(const Chain& o) {
  for (const auto& b : o.blocks_) blocks_.push_back(b->clone());
  compile();
}

template <class T>
std::unique_ptr<Chain<double>> Chain<T>::to_double() const {
  std::vector<std::unique_ptr<Block<double>>> blocks;
  for (const auto& b : blocks_) blocks.push_back(b->to_double());
  return std::make_unique<Chain<double>>(std::move(blocks));
}

template <class T>
void Chain<T>::compile() {
  if (blocks_.empty()) throw std::invalid_argument("blocks must hold at least one block");
  for (std::size_t i = 1; i < blocks_.size(); ++i)
    if (blocks_[i - 1]->out_width() != blocks_[i]->in_width())
      throw std::invalid_argument(
          "block " + std::to_string(i - 1) + " (" + blocks_[i - 1]->describe() + ") gives width " +
          std::to_string(blocks_[i - 1]->out_width()) + " but block " + std::to_string(i) + " (" +
          blocks_[i]->describe() + ") takes " + std::to_string(blocks_[i]->in_width()));
  params_.clear();
  for (std::size_t i = 0; i < blocks_.size(); ++i)
    name_tree(*blocks_[i], std::to_string(i), params_);
  // Parameters before buffers, so that parameter i of the chain is gradient i.
  std::stable_partition(params_.begin(), params_.end(),
                        [](const ParamRef<T>& p) { return !p.buffer; });
  n_trainable_ = static_cast<std::size_t>(std::count_if(
      params_.begin(), params_.end(), [](const ParamRef<T>& p) { return !p.buffer; }));

  auto plan = std::make_shared<Plan>();
  Compiler<T> c{plan->steps, plan->width};
  int cur = c.boundary(blocks_.front()->in_width());
  plan->top.push_back(0);
  std::vector<int> top_of_boundary{0};
  for (std::size_t i = 0; i < blocks_.size(); ++i) {
    c.top_block = static_cast<int>(i);
    cur = c.block(blocks_[i].get(), cur, "");
    top_of_boundary.push_back(cur);
  }
  const std::size_t nb = plan->width.size();
  plan->last = cur;
  plan->top.assign(nb, -1);
  for (std::size_t t = 0; t < top_of_boundary.size(); ++t)
    plan->top[static_cast<std::size_t>(top_of_boundary[t])] = static_cast<int>(t);
  plan->stored.assign(nb, 0);
  plan->stored[0] = 1;
  plan->stored[static_cast<std::size_t>(cur)] = 1;
  for (const Step& s : plan->steps) {
    if (s.kind == Step::Kind::join) {
      plan->stored[static_cast<std::size_t>(s.skip)] = 1;
      plan->stored[static_cast<std::size_t>(s.rin)] = 1;
      continue;
    }
    if (s.block->saves_input()) plan->stored[static_cast<std::size_t>(s.in)] = 1;
    if (s.block->saves_output()) plan->stored[static_cast<std::size_t>(s.out)] = 1;
  }
  // A boundary below the normal floats is no underflow where every block reading it
  // absorbs a tiny input (the chain's output is read by the loss, which does not).
  std::vector<int> readers(nb, 0), absorbing(nb, 0);
  for (const Step& s : plan->steps) {
    if (s.kind == Step::Kind::join) {
      for (int b : {s.in, s.skip, s.rin})
        if (b >= 0) ++readers[static_cast<std::size_t>(b)];
      continue;
    }
    ++readers[static_cast<std::size_t>(s.in)];
    if (s.block->absorbs_tiny_input()) ++absorbing[static_cast<std::size_t>(s.in)];
  }
  plan->absorbed.assign(nb, 0);
  for (std::size_t b = 0; b < nb; ++b)
    plan->absorbed[b] = static_cast<int>(b) != cur && readers[b] > 0 && readers[b] == absorbing[b];
  plan->offset.assign(nb, 0);
  std::size_t off = 0;
  for (std::size_t b = 0; b < nb; ++b) {
    plan->maxw = std::max(plan->maxw, plan->width[b]);
    if (!plan->stored[b]) continue;
    plan->offset[b] = off;
    off += static_cast<std::size_t>(plan->width[b]);
  }
  plan->stored_per_row = off;
  for (const ParamRef<T>& p : params_) plan->max_param = std::max(plan->max_param, p.size);
  plan->any_params = n_trainable_ > 0;
  for (const Step& s : plan->steps)
    if (s.kind == Step::Kind::leaf && s.block->draw_size() > 0) plan->drawn = true;
  plan->top_boundary = top_of_boundary;
  auto all = std::make_shared<Plan>(*plan);
  all->stored.assign(nb, 1);
  off = 0;
  for (std::size_t b = 0; b < nb; ++b) {
    all->offset[b] = off;
    off += static_cast<std::size_t>(all->width[b]);
  }
  all->stored_per_row = off;
  plan_ = std::move(plan);
  trace_plan_ = std::move(all);
}

template <class T>
std::string Chain<T>::where(const Step& s) const {
  const Block<T>& b = *blocks_[static_cast<std::size_t>(s.top_block)];
  return "block " + std::to_string(s.top_block) + " (" + b.describe() + ", '" + b.name() + "')" +
         s.where_in;
}

template <class T>
void Chain<T>::init(const InitSpec& spec, std::uint64_t seed, Canceller* cancel, bool keep_units) {
  spec.validate();
  // In parameters() order (a residual's body before its shortcut), not in the order the
  // steps run.
  std::vector<Linear<T>*> linears;
  for (const ParamRef<T>& p : params_)
    if (!p.buffer && p.index == 0 && p.block->kind() == BlockKind::linear)
      linears.push_back(static_cast<Linear<T>*>(p.block));
  const Philox rng(seed);
  // Each layer draws from its own stream, so the split across threads changes nothing.
  // LAPACK (orthogonal init) runs single-threaded inside the parallel loop.
  BlasThreads one(1);
  struct Scratch {};
  parallel_indices<Scratch>(0, static_cast<int>(linears.size()), max_threads(), cancel,
                            [&](int k, Scratch&) {
                              linears[static_cast<std::size_t>(k)]->init(
                                  spec, rng, static_cast<std::uint64_t>(k), cancel, keep_units);
                            });
}

template <class T>
void Chain<T>::params_changed() {
  for (const Step& s : plan_->steps)
    if (s.kind == Step::Kind::leaf) s.block->params_changed();
}

template <class T>
bool Chain<T>::couples_batch(bool train) const {
  for (const Step& s : plan_->steps)
    if (s.kind == Step::Kind::leaf && s.block->couples_batch(train)) return true;
  return false;
}

// ---- the driver --------------------------------------------------------------------------

namespace {

// The pipelined backward pass hands each step's dL/dy to the second thread through a ring of
// slots, each reused once that thread is done with it: slots written again soon are still in
// cache, where one slot per step would send every write to memory. About this many bytes
// (half a core's L2 today), and at least kMinSlots slots, so that the second thread may lag a
// few steps behind.
constexpr double kRingBytes = 1 << 19;
constexpr std::size_t kMinSlots = 8;
std::size_t ring_slots(std::size_t steps, std::size_t slot_bytes) {
  const double fit = kRingBytes / double(std::max<std::size_t>(1, slot_bytes));
  const std::size_t want = std::max(kMinSlots, static_cast<std::size_t>(fit));
  return std::min(steps, want);
}

struct Threading {
  bool split_forward = false;     // the batch in two parts (by the problem's size alone)
  bool parallel_forward = false;  // the parts on two threads
  bool two_threads = false;       // the backward pass pipelined on two threads
  bool threaded_gemm = false;
  int cores = 1;
};

template <class T, class Steps>
Threading decide_threads(const Steps& steps, std::size_t B, bool coupled) {
  double max_work = 0, total_work = 0;
  for (const auto& s : steps) {
    if (s.block->kind() != BlockKind::linear) continue;
    const double w = double(B) * s.block->in_width() * s.block->out_width();
    max_work = std::max(max_work, w);
    total_work += w;
  }
  Threading t;
  const bool enough = B >= 2 && total_work >= kOwnThreadsWork;
  // Whether the batch is split depends on its size alone, so that the results (a GEMM's
  // sums depend on how many rows it gets) are the same for any thread count.
  t.split_forward = enough && !coupled;
#ifdef _OPENMP
  t.two_threads = max_threads() > 1 && enough;
#endif
  t.parallel_forward = t.split_forward && t.two_threads;
  t.cores = std::max(max_threads(), blas_threads());
  // With a batch to split, two threads of gradchain's own beat OpenBLAS's threads at every
  // size (see the README); otherwise large products split their columns in two (by size
  // alone, so that the sums do not depend on the thread count).
  t.threaded_gemm = !t.split_forward && max_work >= kThreadedGemmWork;
  return t;
}

// How a pass walks the chain: in segments of whole top-level blocks. A chain that draws its
// parameters draws one segment's at a time (once for the forward pass, once more for the
// backward pass, which a recomputed segment shares). With checkpointing only each segment's
// first boundary outlives the forward pass, and the boundaries of one segment at a time are
// kept (recomputed from it in the backward pass).
struct Schedule {
  std::vector<std::size_t> step0;  // each segment's first step, then the number of steps
  std::vector<int> start;          // each segment's input boundary
  bool recompute = false;
  bool per_segment = false;           // boundaries are kept one segment at a time
  std::vector<char> keep;             // per boundary: kept in the storage
  std::vector<std::size_t> off;       // per kept boundary: offset per example
  std::size_t seg_per_row = 0;        // the storage per example (the largest segment's)
  std::vector<std::size_t> ck_off;    // per segment: its input's offset per example
  std::size_t ck_per_row = 0;         // the checkpoints per example
  std::vector<std::size_t> draw_off;  // per step: offset of its drawn parameters
  std::size_t draw_max = 0;           // the largest segment's drawn parameters
  // The pipelined backward pass's ring of dL/dy slots (see ring_slots): a step with
  // parameters takes slot ord % ring, ord being its place among the steps with parameters of
  // its segment, last first (the order both threads take them in); a slot holds `slot`
  // entries.
  std::vector<std::size_t> ord;
  std::size_t ring = 0, slot = 0;
  std::size_t segments() const { return start.size(); }
  // The boundaries of segment i: its input up to the next segment's input.
  int first(std::size_t i) const { return start[i]; }
};

// A segment's parameters drawn at once: up to this many entries (unless one block has more).
constexpr std::size_t kDrawChunk = 1 << 20;

template <class T, class Plan>
Schedule make_schedule(const Plan& P, std::size_t B, const ChainRequest& req) {
  Schedule S;
  const std::size_t nsteps = P.steps.size();
  const std::size_t NB = P.width.size();
  const std::size_t nblocks = P.top_boundary.size() - 1;
  std::vector<std::size_t> draw(nblocks, 0), kept(nblocks, 0);  // per top-level block
  for (const auto& s : P.steps)
    if (s.kind == std::decay_t<decltype(s)>::Kind::leaf)
      draw[static_cast<std::size_t>(s.top_block)] += s.block->draw_size();
  for (std::size_t si = 0; si < nsteps; ++si) {
    const auto& s = P.steps[si];
    if (P.stored[static_cast<std::size_t>(s.out)])
      kept[static_cast<std::size_t>(s.top_block)] +=
          static_cast<std::size_t>(P.width[static_cast<std::size_t>(s.out)]);
  }
  const int k_req = (req.trace || req.loss_only) ? 0 : req.checkpoint;
  std::size_t k = nblocks;  // top-level blocks per segment
  bool recompute = false;
  if (k_req > 0) {
    k = static_cast<std::size_t>(k_req);
  } else if (k_req < 0) {
    // Memory ~ (n / k) checkpoints + k blocks' storage and parameters: least at
    // k = sqrt(n c / m).
    double c = 0, m = 0;
    for (std::size_t t = 0; t < nblocks; ++t) {
      c += double(P.width[static_cast<std::size_t>(P.top_boundary[t])]) * double(B);
      m += double(kept[t]) * double(B) + double(draw[t]);
    }
    c /= double(nblocks);
    m /= double(nblocks);
    k = static_cast<std::size_t>(std::llround(std::sqrt(double(nblocks) * c / std::max(m, 1.0))));
    k = std::max<std::size_t>(k, 1);
  }
  if (k < nblocks && !req.forward_only) recompute = true;
  // Cut points (top-level indices).
  std::vector<std::size_t> cuts{0};
  if (k < nblocks) {
    for (std::size_t t = k; t < nblocks; t += k) cuts.push_back(t);
  } else if (P.drawn) {
    std::size_t acc = 0;
    for (std::size_t t = 0; t < nblocks; ++t) {
      if (acc > 0 && acc + draw[t] > kDrawChunk) {
        cuts.push_back(t);
        acc = 0;
      }
      acc += draw[t];
    }
  }
  S.recompute = recompute;
  // A forward-only pass keeps nothing past the segment it is in.
  S.per_segment = recompute || (req.forward_only && !req.trace && cuts.size() > 1);
  for (std::size_t t : cuts) S.start.push_back(P.top_boundary[t]);
  S.step0.assign(cuts.size() + 1, nsteps);
  {
    std::size_t seg = 0;
    for (std::size_t si = 0; si < nsteps; ++si) {
      const std::size_t t = static_cast<std::size_t>(P.steps[si].top_block);
      while (seg < cuts.size() && cuts[seg] <= t) S.step0[seg++] = si;
    }
  }
  S.draw_off.assign(nsteps, 0);
  for (std::size_t i = 0; i + 1 < S.step0.size(); ++i) {
    std::size_t acc = 0;
    for (std::size_t si = S.step0[i]; si < S.step0[i + 1]; ++si) {
      const auto& s = P.steps[si];
      S.draw_off[si] = acc;
      if (s.kind == std::decay_t<decltype(s)>::Kind::leaf) acc += s.block->draw_size();
    }
    S.draw_max = std::max(S.draw_max, acc);
  }
  S.ord.assign(nsteps, 0);
  std::size_t most = 0;  // steps with parameters in a segment
  for (std::size_t i = 0; i + 1 < S.step0.size(); ++i) {
    std::size_t n = 0;
    for (std::size_t si = S.step0[i + 1]; si-- > S.step0[i];)
      if (P.steps[si].nparams > 0) {
        S.ord[si] = n++;
        S.slot = std::max(S.slot, B * static_cast<std::size_t>(
                                          P.width[static_cast<std::size_t>(P.steps[si].out)]));
      }
    most = std::max(most, n);
  }
  S.ring = ring_slots(most, S.slot * sizeof(T));
  if (!S.per_segment) {
    S.keep = P.stored;
    S.off = P.offset;
    S.seg_per_row = P.stored_per_row;
    return S;
  }
  S.keep = P.stored;
  for (int b : S.start) S.keep[static_cast<std::size_t>(b)] = 1;
  S.off.assign(NB, 0);
  std::size_t off = 0;
  for (std::size_t b = 0; b < NB; ++b) {
    if (!S.keep[b]) continue;
    S.off[b] = off;
    off += static_cast<std::size_t>(P.width[b]);
  }
  for (std::size_t i = 0; i < S.start.size(); ++i) {
    const std::size_t b0 = static_cast<std::size_t>(S.start[i]);
    const std::size_t end =
        i + 1 < S.start.size()
            ? S.off[static_cast<std::size_t>(S.start[i + 1])] +
                  static_cast<std::size_t>(P.width[static_cast<std::size_t>(S.start[i + 1])])
            : off;
    S.seg_per_row = std::max(S.seg_per_row, end - S.off[b0]);
    S.ck_off.push_back(S.ck_per_row);
    if (recompute) S.ck_per_row += static_cast<std::size_t>(P.width[b0]);
  }
  return S;
}

}  // namespace

// What a pass allocates: the part it cannot do without, and the store of dL/dy that lets
// two threads pipeline the backward pass (used when memory allows).
template <class T>
typename Chain<T>::PassBytes Chain<T>::pass_bytes(int batch, const ChainRequest& req) const {
  const Plan& p = req.trace ? *trace_plan_ : *plan_;
  const double B = batch, W = p.maxw, NB = double(p.width.size());
  const double nsteps = double(p.steps.size());
  const Threading th = decide_threads<T>(p.steps, static_cast<std::size_t>(batch),
                                         couples_batch(req.train) || req.trace);
  const double parts = th.split_forward ? 2 : 1;
  const Schedule S = make_schedule<T>(p, static_cast<std::size_t>(batch), req);
  // Kept boundaries (one segment's with checkpointing), checkpoints, drawn parameters.
  double elems = B * double(S.seg_per_row) + B * double(S.ck_per_row) + double(S.draw_max) + 1;
  elems += 3 * B * W + 1;  // the parts' transients and block scratch
  int joins = 0;
  for (const Step& s : p.steps) joins += s.kind == Step::Kind::join ? 1 : 0;
  if (!req.forward_only || req.trace) {
    elems += (4 + 2 * std::min(joins, 64) + 1) * B * W;  // gradient buffers
    elems += 2.0 * std::max<double>(1, 2.0 * double(p.max_param)) *
             (th.two_threads ? 2 : 1);  // parameter-gradient scratch
  }
  elems += B * p.width[static_cast<std::size_t>(p.last)];  // the output
  if (req.keep_param_grads)
    for (const ParamRef<T>& r : params_) elems += r.buffer ? 0 : double(r.size);
  double top_width = 0;
  for (std::size_t b = 0; b < p.width.size(); ++b)
    if (p.top[b] >= 0) top_width += p.width[b];
  if (req.keep_boundary_grads) elems += B * top_width;
  if (req.trace) elems += B * double(p.stored_per_row);  // the traced copies
  // Per boundary: exponents (one, and each part's), maxima, placements, live gradients,
  // producers; per step: per-pass data (BatchNorm: two doubles per feature), pipeline
  // offsets and exponents; per parameter: norms and exponents; the result's norms.
  double local = 0;
  for (const Step& s : p.steps)
    if (s.kind == Step::Kind::leaf && s.block->couples_batch(req.train))
      local += 16.0 * s.block->out_width();
  PassBytes r;
  r.needed = elems * sizeof(T) + NB * (8 + parts * 32 + 24 + 4) + nsteps * (24 + 16 + 8) + local +
             double(n_trainable_) * 24 + NB * 8 + 4096;
  if (th.two_threads && p.any_params && !req.forward_only)
    r.pipeline = double(S.ring) * double(S.slot) * sizeof(T);
  return r;
}

template <class T>
void Chain<T>::recycle_param_grads(std::vector<std::vector<T>>&& grads) {
  std::unique_lock<std::mutex> lock(ws_mutex_, std::try_to_lock);
  if (lock.owns_lock() && ws_) ws_->param_grads = std::move(grads);
}

template <class T>
double Chain<T>::backward_bytes(int batch, const ChainRequest& req) const {
  const PassBytes p = pass_bytes(batch, req);
  return p.needed + p.pipeline;
}

template <class T>
ChainResult<T> Chain<T>::backward(const T* x, int batch, const ChainRequest& req,
                                  Canceller& cancel) {
  if (batch <= 0)
    throw std::invalid_argument("batch must be positive; got " + std::to_string(batch));
  const Plan& P = req.trace ? *trace_plan_ : *plan_;
  const std::size_t B = static_cast<std::size_t>(batch);
  const std::size_t NB = P.width.size();
  const auto w = [&](int b) {
    return static_cast<std::size_t>(P.width[static_cast<std::size_t>(b)]);
  };
  const bool coupled = couples_batch(req.train);
  for (const Step& s : P.steps)
    if (s.kind == Step::Kind::leaf && req.train && s.block->couples_batch(true) && B < 2)
      throw std::invalid_argument(where(s) +
                                  ": Expected more than 1 value per channel when training "
                                  "(a train-mode BatchNorm needs a batch of 2 or more)");

  // A workspace kept from an earlier pass is reused or freed before anything is allocated.
  std::unique_lock<std::mutex> ws_lock(ws_mutex_, std::try_to_lock);
  const PassBytes need = pass_bytes(batch, req);
  const double held = ws_lock.owns_lock() && ws_ ? ws_->bytes() : 0.0;
  check_memory(need.needed, req.forward_only ? "this forward pass" : "this backward pass", held);
  const double bytes = need.needed + need.pipeline;
  std::unique_lock<std::mutex> run_lock(run_mutex_, std::defer_lock);
  if (coupled && req.train && !req.trace) run_lock.lock();  // running statistics are written

  const Threading th = decide_threads<T>(P.steps, B, coupled || req.trace);
  // OpenBLAS always on one thread (its threads' sums depend on their count); an unsplit
  // batch's large products split their columns on the core's own threads instead.
  BlasThreads blas_threads_guard(1);
  blas::SplitColumns split_columns(th.threaded_gemm);
  ElementwiseThreads elementwise(th.threaded_gemm ? 1 : 0);

  // ---- storage ---------------------------------------------------------------------------
  Workspace local_ws;
  if (ws_lock.owns_lock() && !ws_) ws_ = std::make_shared<Workspace>();
  const bool keep_ws = ws_lock.owns_lock() && bytes <= kKeptWorkspaceBytes;
  if (ws_lock.owns_lock() && !keep_ws) ws_ = std::make_shared<Workspace>();
  Workspace& ws = keep_ws ? *ws_ : local_ws;
  auto& Hbuf = ws.h;
  auto& Sbuf = ws.s;
  auto& Gbuf = ws.g;
  auto& DYbuf = ws.dy;
  auto& PGbuf = ws.pg;
  auto& PG2 = ws.pg2;
  const Schedule SC = make_schedule<T>(P, B, req);
  const std::size_t nseg = SC.segments();
  T* H;
  T* CK;
  T* D;
  try {
    H = Hbuf.get(std::max<std::size_t>(1, B * SC.seg_per_row));
    CK = ws.ck.get(std::max<std::size_t>(1, B * SC.ck_per_row));
    D = ws.dr.get(std::max<std::size_t>(1, SC.draw_max));
  } catch (const std::bad_alloc&) {
    throw MemoryRequestError("could not allocate " + std::to_string(bytes) +
                             " bytes for this backward pass");
  }
  const std::size_t W = static_cast<std::size_t>(P.maxw);
  // The segment whose boundaries the storage holds (with per-segment storage) and whose
  // parameters D holds.
  std::size_t cur = 0;
  auto stored = [&](int b) {
    const std::size_t base = SC.per_segment ? SC.off[static_cast<std::size_t>(SC.first(cur))] : 0;
    return H + B * (SC.off[static_cast<std::size_t>(b)] - base);
  };
  auto drawn = [&](const Step& s, std::size_t si) -> const T* {
    if (s.kind != Step::Kind::leaf || s.block->draw_size() == 0) return nullptr;
    return D + SC.draw_off[si];
  };
  // Draws the parameters of segment i (its blocks on the core's threads).
  auto draw_segment = [&](std::size_t i) {
    if (!P.drawn) return;
    struct Scratch {};
    // A few small layers are drawn sooner than a second thread wakes up.
    std::size_t n = 0;
    for (std::size_t si = SC.step0[i]; si < SC.step0[i + 1]; ++si)
      if (P.steps[si].kind == Step::Kind::leaf) n += P.steps[si].block->draw_size();
    parallel_indices<Scratch>(static_cast<int>(SC.step0[i]), static_cast<int>(SC.step0[i + 1]),
                              n >= kOwnThreadsWork ? max_threads() : 1, &cancel,
                              [&](int k, Scratch&) {
                                const Step& s = P.steps[static_cast<std::size_t>(k)];
                                if (s.kind == Step::Kind::leaf && s.block->draw_size() > 0)
                                  s.block->draw(D + SC.draw_off[static_cast<std::size_t>(k)]);
                              });
  };
  // Boundary exponents (after the forward pass: one per boundary) and each boundary's
  // largest entry (for underflow checks).
  std::vector<std::int64_t> e(NB, 0);
  std::vector<std::vector<double>> locals(P.steps.size());
  // The nearest step after si (up) or before it (down) with parameters, within the segment
  // at hand (-1: none): a step with parameters has that one's loaded during its own
  // product. Searched when needed (from steps with parameters only, so each pass walks the
  // steps once more), which keeps the pass's memory as backward_memory counts it.
  auto up = [&](std::size_t si) {
    for (std::size_t k = si + 1; k < SC.step0[cur + 1]; ++k)
      if (P.steps[k].nparams > 0) return static_cast<int>(k);
    return -1;
  };
  auto down = [&](std::size_t si) {
    for (std::size_t k = si; k-- > SC.step0[cur];)
      if (P.steps[k].nparams > 0) return static_cast<int>(k);
    return -1;
  };
  // A chain whose parameters and kept boundaries fit in a core's cache has nothing to wait
  // for: it skips the prefetches (they cost a little in every product).
  double data_bytes = double(B) * double(SC.seg_per_row) + double(SC.draw_max);
  for (const ParamRef<T>& r : params_) data_bytes += double(r.size);
  const bool prefetching = data_bytes * sizeof(T) > kCachedBytes;
  // Step `to`'s parameters, where it lies in the segment at hand (whose drawn ones D holds).
  auto prefetch_step = [&](int to) {
    if (to < 0) return;
    const Step& s = P.steps[static_cast<std::size_t>(to)];
    if (s.kind == Step::Kind::leaf) s.block->prefetch(drawn(s, static_cast<std::size_t>(to)));
  };

  ChainResult<T> res;
  res.norm_type = req.norm_type;

  // ---- forward -----------------------------------------------------------------------------
  // Examples do not interact unless a train-mode BatchNorm couples them, so with two
  // threads each takes half the batch through the whole chain with its own exponents;
  // they are reconciled afterwards.
  struct Part {
    std::size_t r0 = 0, r1 = 0;
    std::vector<std::int64_t> e;
    std::vector<double> mx;
    std::vector<T*> at;    // where each boundary's rows of this part live
    T* scratch = nullptr;  // 3 x rows x W: two transient values and the block's scratch
    int bad_step = -1;
    bool bad_nan = false, bad_underflow = false;
    double bad_value = 0;
    std::exception_ptr error;
  };
  std::vector<Part> parts(th.split_forward ? 2 : 1);
  T* S = Sbuf.get(3 * B * W * 1 + 1);
  for (std::size_t t = 0; t < parts.size(); ++t) {
    Part& p = parts[t];
    p.r0 = B * t / parts.size();
    p.r1 = B * (t + 1) / parts.size();
    p.scratch = S + 3 * p.r0 * W;
  }
  std::atomic<bool> abort{false};

  for (Part& p : parts) {
    p.e.assign(NB, 0);
    p.mx.assign(NB, 0.0);
    p.at.assign(NB, nullptr);
  }
  // Steps [s0, s1) of segment `seg` of the forward pass for one part's rows; false once the
  // part has stopped. The call from the segment's first step takes its input: the first
  // segment's from x, any other's from its input boundary where the storage holds it.
  auto forward_rows = [&](Part& p, bool polls, std::size_t seg, bool from_x, std::size_t s0,
                          std::size_t s1) -> bool {
    const std::size_t R = p.r1 - p.r0;
    T* tr[2] = {p.scratch, p.scratch + R * W};
    T* bscratch = p.scratch + 2 * R * W;
    std::vector<T*>& at = p.at;
    auto place = [&](int b, int avoid_slot) -> T* {
      if (SC.keep[static_cast<std::size_t>(b)]) return stored(b) + p.r0 * w(b);
      return tr[avoid_slot == 0 ? 1 : 0];
    };
    auto slot_of = [&](const T* ptr) { return ptr == tr[0] ? 0 : (ptr == tr[1] ? 1 : -1); };
    // Finite and underflow checks, then into the band.
    auto settle = [&](int si, int b, std::int64_t eb, double in_max, bool can_zero) {
      T* y = at[static_cast<std::size_t>(b)];
      const std::size_t m = R * w(b);
      const MaxAbs s = max_abs(y, m);
      if (!s.finite) {
        p.bad_step = si;
        for (std::size_t i = 0; i < m; ++i)
          if (std::isnan(static_cast<double>(y[i]))) p.bad_nan = true;
        return false;
      }
      // A subnormal input is exact (scaling it into the band loses nothing); only a block's
      // output can have underflowed.
      if (si >= 0 && !P.absorbed[static_cast<std::size_t>(b)] &&
          ((s.value > 0 && s.value < std::numeric_limits<T>::min()) ||
           (s.value == 0 && in_max > 0 && !can_zero))) {
        p.bad_step = si;
        p.bad_underflow = true;
        p.bad_value = s.value;
        return false;
      }
      const int k = rescale_exponent<T>(s.value);
      scale_pow2(y, m, -k);
      p.e[static_cast<std::size_t>(b)] = eb + k;
      p.mx[static_cast<std::size_t>(b)] = std::ldexp(s.value, -k);
      return true;
    };
    if (s0 == SC.step0[seg]) {
      const int b0 = SC.first(seg);
      at[static_cast<std::size_t>(b0)] = stored(b0) + p.r0 * w(b0);
      if (from_x) {
        std::copy(x + p.r0 * w(0), x + p.r1 * w(0), at[0]);
        if (!settle(-1, 0, 0, 1.0, true)) return false;
      }
    }
    for (std::size_t si = s0; si < s1; ++si) {
      const Step& s = P.steps[si];
      const int in_slot = slot_of(at[static_cast<std::size_t>(s.in)]);
      T* y = place(s.out, in_slot);
      at[static_cast<std::size_t>(s.out)] = y;
      std::int64_t ey;
      bool can_zero = true;
      if (s.kind == Step::Kind::join) {
        const auto* r = static_cast<const Residual<T>*>(s.block);
        ey = r->join(R, at[static_cast<std::size_t>(s.skip)], p.e[static_cast<std::size_t>(s.skip)],
                     at[static_cast<std::size_t>(s.in)], p.e[static_cast<std::size_t>(s.in)], y);
      } else {
        // The next layer's parameters, and where the next step writes, during a product long
        // enough to hide their loads.
        if (prefetching && s.nparams > 0 && double(R) * w(s.in) * w(s.out) >= kPrefetchWork) {
          prefetch_step(up(si));
          if (si + 1 < SC.step0[seg + 1]) {
            const int o = P.steps[si + 1].out;
            if (SC.keep[static_cast<std::size_t>(o)])
              small::prefetch_during_next(stored(o) + p.r0 * w(o), R * w(o) * sizeof(T));
          }
        }
        ForwardArgs<T> a;
        a.rows = R;
        a.x = at[static_cast<std::size_t>(s.in)];
        a.ex = p.e[static_cast<std::size_t>(s.in)];
        a.y = y;
        a.scratch = bscratch;
        a.train = req.train;
        a.local = &locals[si];
        a.drawn = drawn(s, si);
        ey = s.block->forward(a);
        can_zero = s.block->can_zero();
      }
      if (!settle(static_cast<int>(si), s.out, ey, p.mx[static_cast<std::size_t>(s.in)], can_zero))
        return false;
      if (abort.load(std::memory_order_relaxed)) return false;
      if (polls) cancel.poll();
    }
    return true;
  };

  // Checkpoint i holds segment i's input boundary as each part left it (its rows at the
  // part's own exponent), from which the segment is recomputed exactly.
  auto save_checkpoint = [&](std::size_t i) {
    if (!SC.recompute) return;
    const int b = SC.first(i);
    for (const Part& p : parts)
      std::copy(stored(b) + p.r0 * w(b), stored(b) + p.r1 * w(b),
                CK + B * SC.ck_off[i] + p.r0 * w(b));
  };
  auto load_checkpoint = [&](std::size_t i) {
    const int b = SC.first(i);
    for (Part& p : parts) {
      T* dst = stored(b) + p.r0 * w(b);
      const T* src = CK + B * SC.ck_off[i] + p.r0 * w(b);
      std::copy(src, src + (p.r1 - p.r0) * w(b), dst);
    }
  };
  auto run_parts = [&](std::size_t seg, bool from_x) {
    const std::size_t a = SC.step0[seg], e = SC.step0[seg + 1];
    if (!th.parallel_forward) {
      // On one thread the parts take each step in turn, so that a step's parameters come
      // from memory once, not once per part (each part's numbers are the same either way).
      // The segment's parameters stay as they are while it runs.
      small::KeepPacked same_params;
      std::vector<char> live(parts.size(), 1);
      for (std::size_t si = a; si == a || si < e; ++si)
        for (std::size_t t = 0; t < parts.size(); ++t)
          if (live[t]) live[t] = forward_rows(parts[t], true, seg, from_x, si, std::min(si + 1, e));
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(team_threads(2))
      {
        const auto t = static_cast<std::size_t>(omp_get_thread_num());
        try {
          forward_rows(parts[t], t == 0, seg, from_x, a, e);
        } catch (...) {
          parts[t].error = std::current_exception();
          abort.store(true);
        }
      }
#endif
    }
    for (const Part& p : parts)
      if (p.error) std::rethrow_exception(p.error);
  };
  auto failed = [&] {
    for (const Part& p : parts)
      if (p.bad_step != -1) return true;
    return false;
  };
  for (std::size_t i = 0; i < nseg; ++i) {
    if (i > 0 && SC.per_segment) {
      // The storage moves on to segment i: its input goes to the segment's start.
      const int b = SC.first(i);
      std::vector<T> carry(stored(b), stored(b) + B * w(b));
      cur = i;
      std::copy(carry.begin(), carry.end(), stored(b));
    }
    cur = i;
    draw_segment(i);
    run_parts(i, i == 0);
    if (failed()) break;
    if (i == 0) save_checkpoint(0);
    if (i + 1 < nseg) save_checkpoint(i + 1);
  }
  {
    const Part* first = nullptr;
    for (const Part& p : parts)
      if (p.bad_step != -1 && (!first || p.bad_step < first->bad_step)) first = &p;
    if (first) {
      const int si = first->bad_step;
      const std::string at =
          si < 0 ? std::string("the input") : where(P.steps[static_cast<std::size_t>(si)]);
      // The top-level block (1-based) it happened in; 0 for the input.
      const std::int64_t index = si < 0 ? 0 : P.steps[static_cast<std::size_t>(si)].top_block + 1;
      if (first->bad_underflow) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.3g", first->bad_value);
        throw NonFiniteError(
            "forward", index,
            "the forward pass underflowed in " + at + ": its largest value is " + buf +
                ", below the smallest normal " + (sizeof(T) == 4 ? "float32" : "float64") +
                ", so the signal has lost its precision. A vanishing signal is carried in log "
                "space through Linear layers without bias (or with zero bias), homogeneous "
                "activations (linear, relu, leaky_relu), activations linear near 0 (tanh, "
                "gelu, gelu_tanh, silu, elu), normalisation layers and residual blocks");
      }
      throw NonFiniteError(
          "forward", index,
          std::string("the forward pass ") +
              (first->bad_nan ? "produced NaN" : "overflowed to inf") + " in " + at +
              (first->bad_nan ? "" : "; lower the gain, the weights or the input scale"));
    }
  }
  // Reconcile the parts: one exponent per stored boundary.
  for (std::size_t b = 0; b < NB; ++b) {
    std::int64_t eb = parts[0].e[b];
    for (const Part& p : parts) eb = std::max(eb, p.e[b]);
    e[b] = eb;
  }
  // The kept boundaries of segment i (all of them without per-segment storage) at e.
  auto reconcile = [&](std::size_t i) {
    const std::size_t b0 = SC.per_segment ? static_cast<std::size_t>(SC.first(i)) : 0;
    const std::size_t b1 =
        SC.per_segment && i + 1 < nseg ? static_cast<std::size_t>(SC.first(i + 1)) + 1 : NB;
    for (std::size_t b = b0; b < b1; ++b) {
      if (!SC.keep[b]) continue;
      for (const Part& p : parts)
        if (p.e[b] != e[b])
          scale_pow2(stored(static_cast<int>(b)) + p.r0 * w(static_cast<int>(b)),
                     (p.r1 - p.r0) * w(static_cast<int>(b)), clamp_exp(p.e[b] - e[b]));
    }
  };
  reconcile(cur);
  if (req.train && !req.trace)
    for (std::size_t si = 0; si < P.steps.size(); ++si)
      if (!locals[si].empty()) P.steps[si].block->after_forward(locals[si], B);

  // ---- loss and dL/dh ----------------------------------------------------------------------
  const std::size_t mL = B * w(P.last);
  const T* hL = stored(P.last);
  const std::int64_t eL = e[static_cast<std::size_t>(P.last)];
  res.output.resize(mL);
  write_scaled(hL, mL, eL, 1.0, res.output.data());
  res.output_mantissa.assign(hL, hL + mL);
  res.output_log2_scale = eL;
  if (req.trace) {
    for (std::size_t b = 0; b < NB; ++b)
      res.trace_values.emplace_back(stored(static_cast<int>(b)),
                                    stored(static_cast<int>(b)) + B * w(static_cast<int>(b)));
    res.trace_exps = e;
    res.trace_locals = std::move(locals);
    return res;
  }
  if (req.forward_only) return res;

  // Gradient buffers: a pool of B x W arrays, and with pipelining one slot per step with
  // parameters that keeps dL/dy until the second thread has used it.
  const std::size_t nsteps = P.steps.size();
  int depth_of_nesting = 0;
  for (const Step& s : P.steps) depth_of_nesting += s.kind == Step::Kind::join ? 1 : 0;
  const std::size_t pool_n = 4 + static_cast<std::size_t>(std::min(depth_of_nesting, 64)) * 2;
  T* G = Gbuf.get(pool_n * B * W + B * W);
  std::vector<T*> pool;
  for (std::size_t i = 0; i < pool_n; ++i) pool.push_back(G + i * B * W);
  T* bwd_scratch = G + pool_n * B * W;
  auto pool_get = [&] {
    if (pool.empty()) throw std::logic_error("gradchain: gradient buffer pool exhausted");
    T* p = pool.back();
    pool.pop_back();
    return p;
  };

  const std::vector<std::size_t>& ord = SC.ord;
  const std::size_t ring = SC.ring, slot = SC.slot;
  const std::size_t dy_total = ring * slot;
  bool pipelined = th.two_threads && P.any_params && req.param_grads && dy_total > 0 &&
                   need.pipeline > 0 && memory_allows(bytes - held, 2.0);
  T* DY = nullptr;
  if (pipelined) {
    try {
      DY = DYbuf.get(dy_total);
    } catch (const std::bad_alloc&) {
      pipelined = false;
    }
  }
  // Which step produces each boundary.
  std::vector<int> producer(NB, -1);
  for (std::size_t si = 0; si < nsteps; ++si)
    producer[static_cast<std::size_t>(P.steps[si].out)] = int(si);
  auto is_dy_slot = [&](const T* ptr) { return pipelined && ptr >= DY && ptr < DY + dy_total; };
  auto slot_of = [&](std::size_t si) { return DY + (ord[si] % ring) * slot; };
  // Steps with parameters of the segment whose dL/dy the first thread has handed over, and
  // that the second thread is done with (each thread's count of its own steps).
  std::size_t handed = 0;
  std::atomic<std::size_t> done{0};
  // Whether step si's slot is free (its last user is done) or will be without the first
  // thread doing more: its last user has been handed over. Then waits for it.
  auto claim_slot = [&](std::size_t si) {
    if (ord[si] >= handed + ring) return false;
    while (ord[si] >= ring && done.load(std::memory_order_acquire) < ord[si] - ring + 1) {
      if (abort.load(std::memory_order_relaxed)) return false;
      std::this_thread::yield();
    }
    return true;
  };
  struct Live {
    T* buf = nullptr;
    std::int64_t e = 0;
    bool zero = true;  // every entry exactly 0 (its exponent then means nothing)
  };
  std::vector<Live> live(NB);
  // A new gradient for boundary b goes to its producer's slot when nothing has arrived at
  // b yet; a second contribution (a residual input gets the skip and the body's) goes to a
  // pool buffer and is added into the first.
  auto dest_for = [&](int b) -> T* {
    const int pr = producer[static_cast<std::size_t>(b)];
    if (pipelined && pr >= 0 && P.steps[static_cast<std::size_t>(pr)].nparams > 0 &&
        static_cast<std::size_t>(pr) >= SC.step0[cur] && !live[static_cast<std::size_t>(b)].buf &&
        claim_slot(static_cast<std::size_t>(pr)))
      return slot_of(static_cast<std::size_t>(pr));
    return pool_get();
  };
  auto release = [&](T* ptr) {
    if (!is_dy_slot(ptr)) pool.push_back(ptr);
  };

  // live[b] += v * 2^ev (v: a buffer of B x w(b) that this call takes over).
  auto add_to = [&](int b, T* v, std::int64_t ev) {
    Live& L = live[static_cast<std::size_t>(b)];
    const std::size_t m = B * w(b);
    if (!L.buf) {
      L.buf = v;
      L.e = ev;
      L.zero = false;
      return;
    }
    const bool vz = max_abs(v, m).value == 0;
    const bool lz = max_abs(L.buf, m).value == 0;
    if (!vz) {
      const std::int64_t E = lz ? ev : std::max(L.e, ev);
      const int dl = clamp_exp(L.e - E), dv = clamp_exp(ev - E);
      if (lz) {
        std::copy(v, v + m, L.buf);
        scale_pow2(L.buf, m, dv);
      } else {
        scale_pow2(L.buf, m, dl);
        if (dv == 0) {
          for (std::size_t i = 0; i < m; ++i) L.buf[i] += v[i];
        } else {
          const T f = static_cast<T>(std::ldexp(1.0, std::max(dv, -1100)));
          for (std::size_t i = 0; i < m; ++i) L.buf[i] += v[i] * f;
        }
      }
      L.e = E;
    }
    release(v);
  };

  if (!req.param_grads && (req.keep_param_grads || req.max_norm >= 0))
    throw std::invalid_argument(
        "a pass without parameter gradients can neither return nor clip them");
  res.log10_param_grad_norms.assign(
      n_trainable_, req.param_grads ? kNegInf : std::numeric_limits<double>::quiet_NaN());
  std::vector<double> lp(n_trainable_, kNegInf);  // norm_type norms, for the total
  std::vector<std::int64_t> gexp(n_trainable_, 0);
  const std::size_t ntop =
      static_cast<std::size_t>(*std::max_element(P.top.begin(), P.top.end())) + 1;
  res.log10_boundary_grad_norms.assign(
      ntop, req.boundary_norms ? kNegInf : std::numeric_limits<double>::quiet_NaN());
  std::vector<std::int64_t> bexp(ntop, 0);
  if (req.keep_param_grads) {
    // Every entry is written below: recycled arrays of the right sizes need no zeroing.
    bool reuse = keep_ws && ws.param_grads.size() == n_trainable_;
    for (std::size_t i = 0; reuse && i < n_trainable_; ++i)
      reuse = ws.param_grads[i].size() == params_[i].size;
    if (reuse) res.param_grads = std::move(ws.param_grads);
    ws.param_grads.clear();
    res.param_grads.resize(n_trainable_);
    for (std::size_t i = 0; i < n_trainable_; ++i) res.param_grads[i].resize(params_[i].size);
  }
  if (req.keep_boundary_grads) res.boundary_grads.resize(ntop);

  // The gradient of boundary b is complete: into the band, its norm recorded.
  auto take = [&](int b) -> Live {
    Live L = live[static_cast<std::size_t>(b)];
    live[static_cast<std::size_t>(b)] = Live{};
    const std::size_t m = B * w(b);
    if (!L.buf) {  // nothing flows back here (a zero gradient)
      L.buf = dest_for(b);
      std::fill(L.buf, L.buf + m, T(0));
      L.e = 0;
    }
    const int t = P.top[static_cast<std::size_t>(b)];
    const bool norm = t >= 0 && req.boundary_norms;
    Scan s;
    if (norm) {
      s = scan(L.buf, m);
    } else {
      s.maxabs = max_abs(L.buf, m).value;
    }
    const int k = rescale_exponent<T>(s.maxabs);
    scale_pow2(L.buf, m, -k);
    L.e += k;
    if (t >= 0) {
      if (norm) res.log10_boundary_grad_norms[static_cast<std::size_t>(t)] = log10_norm(s, L.e - k);
      if (req.keep_boundary_grads) {
        res.boundary_grads[static_cast<std::size_t>(t)].assign(L.buf, L.buf + m);
        bexp[static_cast<std::size_t>(t)] = L.e;
      }
    }
    return L;
  };

  {
    T* g = dest_for(P.last);
    std::int64_t gamma = 0;
    ScaledSum terms;
    const double count = req.loss == LossKind::mse             ? double(mL)
                         : req.loss == LossKind::cross_entropy ? double(B)
                                                               : 1.0;
    loss_rows(req.loss, hL, eL, B, w(P.last), req.target, 1.0 / count, g, gamma, terms);
    if (req.loss == LossKind::grad_output) {
      res.loss = res.log10_loss = std::numeric_limits<double>::quiet_NaN();
    } else {
      res.loss = terms.value(count);
      res.log10_loss = terms.log10(count);
    }
    add_to(P.last, g, gamma);
  }
  if (req.loss_only) return res;

  // Parameter gradients of step si from its dL/dy (in the band): nothing downstream needs
  // them, so with two threads a second thread computes them while the first carries dL/dx
  // on down the chain.
  const bool need_values = req.keep_param_grads;
  auto param_grads = [&](std::size_t si, const T* dy, std::int64_t gy, T* pg) {
    const Step& s = P.steps[si];
    const std::size_t n0 = static_cast<std::size_t>(s.param0);
    const std::size_t np = static_cast<std::size_t>(s.nparams);
    constexpr std::size_t kMaxParams = 8;  // a block has a weight and a bias at most today
    if (np > kMaxParams) throw std::logic_error("gradchain: a block with more than 8 parameters");
    T* bufs[kMaxParams];
    std::size_t off = 0;
    for (std::size_t i = 0; i < np; ++i) {
      if (req.keep_param_grads) {
        bufs[i] = res.param_grads[n0 + i].data();
      } else {
        bufs[i] = pg + off;
        off += params_[n0 + i].size;
      }
    }
    ParamGrad out[kMaxParams];
    BackwardArgs<T> a;
    a.rows = B;
    a.x = P.stored[static_cast<std::size_t>(s.in)] ? stored(s.in) : nullptr;
    a.ex = e[static_cast<std::size_t>(s.in)];
    a.y = P.stored[static_cast<std::size_t>(s.out)] ? stored(s.out) : nullptr;
    a.ey = e[static_cast<std::size_t>(s.out)];
    a.dy = dy;
    a.gy = gy;
    a.train = req.train;
    a.local = &locals[si];
    a.drawn = drawn(s, si);
    ParamGradArgs opt;
    opt.norm_type = req.norm_type;
    opt.need_values = need_values;
    const int next = prefetching ? down(si) : -1;  // the input of the next step with parameters
    if (next >= 0) {
      const int in = P.steps[static_cast<std::size_t>(next)].in;
      if (P.stored[static_cast<std::size_t>(in)])
        small::prefetch_during_next(stored(in), B * w(in) * sizeof(T));
    }
    s.block->backward_params(a, opt, bufs, out);
    for (std::size_t i = 0; i < np; ++i) {
      const std::size_t k = n0 + i;
      gexp[k] = out[i].exp;
      if (out[i].has_norms) {
        res.log10_param_grad_norms[k] = out[i].log10_norm;
        lp[k] = out[i].log10_pnorm;
        continue;
      }
      const Scan sc = scan(bufs[i], params_[k].size);
      res.log10_param_grad_norms[k] = log10_norm(sc, out[i].exp);
      lp[k] = log10_pnorm(bufs[i], params_[k].size, sc, out[i].exp, req.norm_type);
    }
  };

  std::atomic<int> ready{static_cast<int>(nsteps)};  // dL/dy of steps >= ready is in DY
  std::vector<std::int64_t> dy_exp(nsteps, 0);
  std::exception_ptr error;
  const std::size_t pg_size = std::max<std::size_t>(1, P.max_param * 2);

  // The gradient at the input is wanted for its norm or its values only.
  const bool input_grad = req.boundary_norms || req.keep_boundary_grads;
  // The backward pass through segment cur.
  auto chain = [&] {
    T* pg = PGbuf.get(pg_size);
    for (std::size_t k = SC.step0[cur + 1]; k-- > SC.step0[cur];) {
      const Step& s = P.steps[k];
      Live dy = take(s.out);
      if (s.kind == Step::Kind::join) {
        const auto* r = static_cast<const Residual<T>*>(s.block);
        T* skip = dest_for(s.skip);
        std::copy(dy.buf, dy.buf + B * w(s.out), skip);
        add_to(s.skip, skip, dy.e);
        T* df = dest_for(s.in);
        const std::int64_t ef = r->join_backward(B, dy.buf, dy.e, df);
        add_to(s.in, df, ef);
        release(dy.buf);
      } else {
        if (s.nparams > 0 && req.param_grads) {
          if (pipelined) {
            T* to = slot_of(k);
            if (dy.buf != to) {  // summed elsewhere (a residual join), or the slot was busy
              if (!claim_slot(k)) return;  // the second thread has failed
              std::copy(dy.buf, dy.buf + B * w(s.out), to);
              release(dy.buf);
              dy.buf = to;
            }
            dy_exp[k] = dy.e;
            ++handed;
            ready.store(static_cast<int>(k), std::memory_order_release);
          } else {
            param_grads(k, dy.buf, dy.e, pg);
          }
        }
        if (s.in == 0 && !input_grad) {  // nothing reads dL/dx
          release(dy.buf);
          if (abort.load(std::memory_order_relaxed)) return;
          continue;
        }
        BackwardArgs<T> a;
        a.rows = B;
        a.x = P.stored[static_cast<std::size_t>(s.in)] ? stored(s.in) : nullptr;
        a.ex = e[static_cast<std::size_t>(s.in)];
        a.y = P.stored[static_cast<std::size_t>(s.out)] ? stored(s.out) : nullptr;
        a.ey = e[static_cast<std::size_t>(s.out)];
        a.dy = dy.buf;
        a.gy = dy.e;
        a.dx = dest_for(s.in);
        a.scratch = bwd_scratch;
        a.train = req.train;
        a.local = &locals[k];
        a.drawn = drawn(s, k);
        if (prefetching && s.nparams > 0) {  // the next layer's parameters, the input read next
          prefetch_step(down(k));
          if (a.x) small::prefetch_during_next(a.x, B * w(s.in) * sizeof(T));
        }
        const std::int64_t gx = s.block->backward_input(a);
        add_to(s.in, a.dx, gx);
        release(dy.buf);
      }
      if (abort.load(std::memory_order_relaxed)) return;
      cancel.poll();
    }
    if (cur > 0) return;
    if (input_grad) {
      Live d0 = take(0);
      release(d0.buf);
    } else if (live[0].buf) {
      release(live[0].buf);
      live[0] = Live{};
    }
  };

  for (std::size_t i = nseg; i-- > 0;) {
    if (i + 1 < nseg) {  // the last segment's parameters and boundaries are at hand
      cur = i;
      draw_segment(i);
      if (SC.recompute) {
        load_checkpoint(i);
        run_parts(i, false);
        reconcile(i);
      }
    }
    ready.store(static_cast<int>(SC.step0[i + 1]));
    handed = 0;
    done.store(0);
    if (!pipelined) {
      chain();
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(team_threads(2))
      {
        try {
          if (omp_get_thread_num() == 0) {
            chain();
          } else {
            T* pg = PG2.get(pg_size);
            for (std::size_t k = SC.step0[cur + 1]; k-- > SC.step0[cur];) {
              if (P.steps[k].nparams == 0) continue;
              while (ready.load(std::memory_order_acquire) > static_cast<int>(k)) {
                if (abort.load(std::memory_order_relaxed)) break;
                std::this_thread::yield();
              }
              if (abort.load(std::memory_order_relaxed)) break;
              param_grads(k, slot_of(k), dy_exp[k], pg);
              done.fetch_add(1, std::memory_order_release);
            }
          }
        } catch (...) {
          abort.store(true);
#pragma omp critical(gradchain_chain_error)
          if (!error) error = std::current_exception();
        }
      }
#endif
    }
    if (error) std::rethrow_exception(error);
  }

  // ---- total norm and clipping (torch.nn.utils.clip_grad_norm_ over parameters()) ------------
  if (!req.param_grads) {
    res.log10_total_norm = std::numeric_limits<double>::quiet_NaN();
    return res;
  }
  const LogClip lc = log_clip<T>(lp, req.norm_type, req.max_norm);
  res.log10_total_norm = lc.log10_total;
  res.clipped = lc.clipped;
  res.max_norm = lc.clipped ? req.max_norm : 0.0;
  res.log10_clip_coef = lc.log10_coef;
  if (req.keep_param_grads)
    for (std::size_t i = 0; i < n_trainable_; ++i) {
      auto& v = res.param_grads[i];
      write_scaled(v.data(), v.size(), gexp[i], lc.coef, v.data(), lc.coef_exp);
    }
  if (req.keep_boundary_grads)
    for (std::size_t t = 0; t < ntop; ++t) {
      auto& v = res.boundary_grads[t];
      write_scaled(v.data(), v.size(), bexp[t], 1.0, v.data());
    }
  return res;
}

template class Chain<float>;
template class Chain<double>;

}  // namespace gradchain
