// Torch binding of the CUDA noise-injection kernels (noise_injection_cuda.cu): checks, allocation,
// device guard and current stream. Same Python-facing functions as the CPU kernel.
// c10/cuda headers only (not ATen/cuda/CUDAContext.h, which needs cuBLAS/cuSPARSE headers).

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
// Narrow ATen headers instead of <torch/extension.h>: much faster to build.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

namespace dsd_noise_cuda {
cudaError_t add_noise_fwd(int dtype, const void* x0, const void* eps, void* x_t, const double* timesteps,
                          const float* table, int64_t table_len, double shift, int64_t num_train_timesteps,
                          float* sigma_out, int64_t batch, int64_t n, cudaStream_t stream);
cudaError_t add_noise_bwd(int dtype, const void* grad, void* grad_x0, void* grad_eps, const float* sigma,
                          int64_t batch, int64_t n, cudaStream_t stream);
cudaError_t sde_fwd(int dtype, const void* x_t, const void* v, const void* eps, void* x0_hat, void* x_next,
                    const float* sigma_t, const float* sigma_next, int64_t batch, int64_t n, cudaStream_t stream);
cudaError_t sde_bwd(int dtype, const void* g_x0, const void* g_next, void* grad_x, void* grad_v, void* grad_eps,
                    const float* sigma_t, const float* sigma_next, int64_t batch, int64_t n, cudaStream_t stream);
}  // namespace dsd_noise_cuda

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    case at::kDouble:
      return 3;
    default:
      TORCH_CHECK(false, "noise injection CUDA kernel supports float32, float16, bfloat16 and float64, got ",
                  t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_cuda(t, name);
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), name, " has shape ", t.sizes(), ", expected ", like.sizes());
}

void check_main(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  dtype_code(t);
  TORCH_CHECK(t.dim() >= 1, "inputs need a batch dimension (rank >= 1)");
}

at::Tensor output_like(const at::Tensor& like, const c10::optional<at::Tensor>& out, const char* name) {
  if (out.has_value() && out->defined()) {
    check_like(*out, name, like);
    TORCH_CHECK(out->is_contiguous(), name, " must be contiguous");
    return *out;
  }
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor per_sample(const at::Tensor& s, const at::Tensor& like, at::ScalarType dtype, const char* name) {
  const int64_t batch = like.size(0);
  TORCH_CHECK(s.numel() == batch, name, " has ", s.numel(), " values, expected ", batch);
  return s.reshape({batch}).to(like.device(), dtype).contiguous();
}

int64_t per_sample_numel(const at::Tensor& x) { return x.size(0) == 0 ? 0 : x.numel() / x.size(0); }

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "noise injection CUDA kernel failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace

std::vector<at::Tensor> add_noise_fwd(const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& timesteps,
                                      const c10::optional<at::Tensor>& sigma_table, double shift,
                                      int64_t num_train_timesteps, const c10::optional<at::Tensor>& out) {
  check_main(x0, "x0");
  check_like(eps, "eps", x0);
  TORCH_CHECK(num_train_timesteps > 0, "num_train_timesteps must be positive");
  const c10::cuda::CUDAGuard guard(x0.device());
  const at::Tensor t = per_sample(timesteps, x0, at::kDouble, "timesteps");
  at::Tensor table;
  if (sigma_table.has_value() && sigma_table->defined()) {
    table = sigma_table->reshape({-1}).to(x0.device(), at::kFloat).contiguous();
    TORCH_CHECK(table.numel() > 0, "sigma_table is empty");
  }
  const at::Tensor x0c = x0.contiguous();
  const at::Tensor ec = eps.contiguous();
  at::Tensor y = output_like(x0, out, "out");
  at::Tensor sigma = at::empty({x0.size(0)}, x0.options().dtype(at::kFloat));
  check_launch(dsd_noise_cuda::add_noise_fwd(
      dtype_code(x0), x0c.data_ptr(), ec.data_ptr(), y.data_ptr(), t.data_ptr<double>(),
      table.defined() ? table.data_ptr<float>() : nullptr, table.defined() ? table.numel() : 0, shift,
      num_train_timesteps, sigma.data_ptr<float>(), x0.size(0), per_sample_numel(x0), stream()));
  return {y, sigma};
}

std::vector<at::Tensor> add_noise_bwd(const at::Tensor& grad, const at::Tensor& sigma) {
  check_main(grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor s = per_sample(sigma, grad, at::kFloat, "sigma");
  const at::Tensor gc = grad.contiguous();
  at::Tensor gx0 = output_like(grad, c10::nullopt, "grad_x0");
  at::Tensor geps = output_like(grad, c10::nullopt, "grad_eps");
  check_launch(dsd_noise_cuda::add_noise_bwd(dtype_code(grad), gc.data_ptr(), gx0.data_ptr(), geps.data_ptr(),
                                             s.data_ptr<float>(), grad.size(0), per_sample_numel(grad), stream()));
  return {gx0, geps};
}

std::vector<at::Tensor> sde_fwd(const at::Tensor& x_t, const at::Tensor& v, const c10::optional<at::Tensor>& eps,
                                const at::Tensor& sigma_t, const at::Tensor& sigma_next,
                                const c10::optional<at::Tensor>& out_x0, const c10::optional<at::Tensor>& out_next) {
  check_main(x_t, "x_t");
  check_like(v, "v", x_t);
  const c10::cuda::CUDAGuard guard(x_t.device());
  const bool last = !(eps.has_value() && eps->defined());
  const at::Tensor st = per_sample(sigma_t, x_t, at::kFloat, "sigma_t");
  const at::Tensor xc = x_t.contiguous();
  const at::Tensor vc = v.contiguous();
  at::Tensor x0_hat = output_like(x_t, out_x0, "out_x0_hat");
  at::Tensor sn, ec, x_next;
  if (!last) {
    check_like(*eps, "eps", x_t);
    sn = per_sample(sigma_next, x_t, at::kFloat, "sigma_next");
    ec = eps->contiguous();
    x_next = output_like(x_t, out_next, "out_x_next");
  }
  check_launch(dsd_noise_cuda::sde_fwd(dtype_code(x_t), xc.data_ptr(), vc.data_ptr(), last ? nullptr : ec.data_ptr(),
                                       x0_hat.data_ptr(), last ? nullptr : x_next.data_ptr(), st.data_ptr<float>(),
                                       last ? nullptr : sn.data_ptr<float>(), x_t.size(0), per_sample_numel(x_t),
                                       stream()));
  return {x0_hat, x_next};
}

std::vector<at::Tensor> sde_bwd(const at::Tensor& g_x0, const c10::optional<at::Tensor>& g_next,
                                const at::Tensor& sigma_t, const at::Tensor& sigma_next) {
  check_main(g_x0, "grad_x0_hat");
  const c10::cuda::CUDAGuard guard(g_x0.device());
  const bool last = !(g_next.has_value() && g_next->defined());
  const at::Tensor st = per_sample(sigma_t, g_x0, at::kFloat, "sigma_t");
  const at::Tensor g0 = g_x0.contiguous();
  at::Tensor gv = output_like(g_x0, c10::nullopt, "grad_v");
  at::Tensor sn, gn, gx, geps;
  if (!last) {
    check_like(*g_next, "grad_x_next", g_x0);
    sn = per_sample(sigma_next, g_x0, at::kFloat, "sigma_next");
    gn = g_next->contiguous();
    gx = output_like(g_x0, c10::nullopt, "grad_x_t");
    geps = output_like(g_x0, c10::nullopt, "grad_eps");
  }
  check_launch(dsd_noise_cuda::sde_bwd(dtype_code(g_x0), g0.data_ptr(), last ? nullptr : gn.data_ptr(),
                                       last ? nullptr : gx.data_ptr(), gv.data_ptr(), last ? nullptr : geps.data_ptr(),
                                       st.data_ptr<float>(), last ? nullptr : sn.data_ptr<float>(), g_x0.size(0),
                                       per_sample_numel(g_x0), stream()));
  if (last) return {g0, gv, at::Tensor()};
  return {gx, gv, geps};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ds_distill fused noise injection, CUDA kernel";
  m.def("add_noise_fwd", &add_noise_fwd, "x_t = (1-sigma)*x0 + sigma*eps; returns [x_t, sigma]", py::arg("x0"),
        py::arg("eps"), py::arg("timesteps"), py::arg("sigma_table") = py::none(), py::arg("shift") = 1.0,
        py::arg("num_train_timesteps") = 1000, py::arg("out") = py::none());
  m.def("add_noise_bwd", &add_noise_bwd, "[(1-sigma)*g, sigma*g]", py::arg("grad"), py::arg("sigma"));
  m.def("sde_fwd", &sde_fwd, "[x0_hat, x_next]", py::arg("x_t"), py::arg("v"), py::arg("eps"), py::arg("sigma_t"),
        py::arg("sigma_next"), py::arg("out_x0_hat") = py::none(), py::arg("out_x_next") = py::none());
  m.def("sde_bwd", &sde_bwd, "[grad_x_t, grad_v, grad_eps]", py::arg("grad_x0_hat"), py::arg("grad_x_next"),
        py::arg("sigma_t"), py::arg("sigma_next"));
}
