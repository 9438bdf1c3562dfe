"""Pure Triton kernels, installed as ``pgsvd_rt.kernels``: one file per op (configs, kernel,
launcher). Importing this package requires Triton; ``pgsvd_rt.ops`` imports it lazily."""
