// pybind11 module epic_ext._C: exposes the host entries of csrc/ to Python. The torch.library
// registration (schemas, fake kernels, autograd) lives in epic_ext/ops.py, which calls these.
#include <torch/extension.h>

#include "epic/checks.h"
#include "epic/ops.h"

using namespace pybind11::literals;

PYBIND11_MODULE(_C, m) {
  m.doc() = "epic_ext compiled kernels (C++ CPU, optionally CUDA)";
  m.attr("has_cuda") = pybind11::bool_(
#ifdef EPIC_WITH_CUDA
      true
#else
      false
#endif
  );
#ifdef _OPENMP
  m.attr("has_openmp") = pybind11::bool_(true);
#else
  m.attr("has_openmp") = pybind11::bool_(false);
#endif

  m.def("set_poison", [](bool on) { epic::g_poison_outputs.store(on); }, "on"_a,
        "Fill every fresh kernel output with NaN / sentinels (test hook).");
  m.def("poison", []() { return epic::g_poison_outputs.load(); });

  auto cpu = m.def_submodule("cpu", "C++ CPU kernels (OpenMP through at::parallel_for)");
  cpu.def("select_topk", &epic::select_topk_cpu, "scores"_a, "k"_a);
  cpu.def("iqr_select", &epic::iqr_select_cpu, "scores"_a, "whisker"_a, "pooled"_a, "max_k"_a);
  cpu.def("gather_merge", &epic::gather_merge_cpu, "tokens"_a, "idx"_a, "counts"_a, "merge"_a,
          "weights"_a);
  cpu.def("gather_merge_backward", &epic::gather_merge_backward_cpu, "grad_out"_a, "idx"_a,
          "counts"_a, "merge"_a, "weights"_a, "n_tokens"_a);
  cpu.def("compress_topk", &epic::compress_topk_cpu, "tokens"_a, "scores"_a, "k"_a, "merge"_a,
          "weights"_a);
  cpu.def("kl_div", &epic::kl_div_cpu, "student"_a, "teacher"_a, "row_mask"_a, "temperature"_a,
          "reduction"_a, "reverse"_a, "compute_grad"_a, "inplace"_a);
  cpu.def("attn_scores", &epic::attn_scores_cpu, "q"_a, "k"_a, "lse"_a, "key_start"_a,
          "key_start_int"_a, "key_len"_a, "kv_start"_a, "kv_start_int"_a, "q_pos"_a, "scale"_a,
          "causal"_a, "reduction"_a);

#ifdef EPIC_WITH_CUDA
  auto cuda = m.def_submodule("cuda", "CUDA kernels");
  cuda.def("select_topk", &epic::select_topk_cuda, "scores"_a, "k"_a);
  cuda.def("iqr_select", &epic::iqr_select_cuda, "scores"_a, "whisker"_a, "pooled"_a, "max_k"_a);
  cuda.def("gather_merge", &epic::gather_merge_cuda, "tokens"_a, "idx"_a, "counts"_a, "merge"_a,
           "weights"_a);
  cuda.def("gather_merge_backward", &epic::gather_merge_backward_cuda, "grad_out"_a, "idx"_a,
           "counts"_a, "merge"_a, "weights"_a, "n_tokens"_a);
  cuda.def("compress_topk", &epic::compress_topk_cuda, "tokens"_a, "scores"_a, "k"_a, "merge"_a,
           "weights"_a);
  cuda.def("kl_div", &epic::kl_div_cuda, "student"_a, "teacher"_a, "row_mask"_a, "temperature"_a,
           "reduction"_a, "reverse"_a, "compute_grad"_a, "inplace"_a);
  cuda.def("attn_scores", &epic::attn_scores_cuda, "q"_a, "k"_a, "lse"_a, "key_start"_a,
           "key_start_int"_a, "key_len"_a, "kv_start"_a, "kv_start_int"_a, "q_pos"_a, "scale"_a,
           "causal"_a, "reduction"_a);
#endif
}
