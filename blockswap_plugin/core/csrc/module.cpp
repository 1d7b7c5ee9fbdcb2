// Python bindings of the compiled CPU helpers (see ops.h).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released so that scoring threads run their kernels at the same time.
  m.def("forward", &bn_relu_forward, "batch norm (training) + ReLU forward: (y, mean, invstd)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &bn_relu_backward, "batch norm (training) + ReLU backward: grad of the input",
        py::call_guard<py::gil_scoped_release>());
  m.def("apply", &bn_relu_apply, "batch norm + ReLU with given statistics (the forward pass's output again)",
        py::call_guard<py::gil_scoped_release>());
  m.def("fisher_terms", &fisher_terms, "per sample and channel sums of activation x gradient (N x C, float)",
        py::call_guard<py::gil_scoped_release>());
  m.def("block_cache_enable", &block_cache_enable,
        "install the block cache (once) and start caching; False if another allocator has priority",
        py::arg("limit_bytes"), py::arg("huge_pages") = true);
  m.def("block_cache_disable", &block_cache_disable, "stop caching and unmap the cached blocks");
  m.def("block_cache_release", &block_cache_release, "unmap the cached blocks, keep caching");
  m.def("block_cache_stats", &block_cache_stats, "counters of the block cache, in blocks and bytes");
}
