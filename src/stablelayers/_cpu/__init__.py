"""The CPU kernels' binding: ``library`` loads the libraries the build compiled from
``_cpu_kernels.cc``; ``calls`` calls them through the XLA FFI and makes the calls
differentiable. Each op's module decides where a kernel applies."""
