"""Build script: the pure-Python package, kernels/ as pgsvd_rt.kernels, and pgsvd_rt._C.

The native extension is built with ninja through torch.utils.cpp_extension:
- CUDAExtension when the installed torch is a CUDA build (torch.version.cuda), else CppExtension;
  a visible GPU is not required to build.
- PGSVD_NO_NATIVE=1 skips native code entirely (the package then runs on the torch reference).
torch is imported from the environment (install with --no-build-isolation); it is never a build
requirement, so pip cannot pull a CUDA wheel behind your back.
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    ns: dict = {}
    with open(os.path.join(HERE, "pgsvd_rt", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _native_extensions():
    if os.environ.get("PGSVD_NO_NATIVE") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    # -fopenmp: at::parallel_for is a header template; without it the CPU kernels run on one thread.
    args = {"cxx": ["-O3", "-std=c++17", "-fopenmp"]}
    if torch.version.cuda is not None and os.environ.get("PGSVD_NO_CUDA") != "1":
        args["nvcc"] = ["-O3", "-std=c++17"]
        ext = CUDAExtension("pgsvd_rt._C", cpp + cu, extra_compile_args=args,
                            extra_link_args=["-fopenmp"],
                            define_macros=[("PGSVD_WITH_CUDA", "1")])
    else:
        ext = CppExtension("pgsvd_rt._C", cpp, extra_compile_args={"cxx": args["cxx"]},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extensions()

setup(
    name="pgsvd_rt",
    version=_version(),
    description="PGSVD low-rank compression of LLMs with a fused Triton runtime",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pgsvd_rt", "pgsvd_rt.*"]) + ["pgsvd_rt.kernels"],
    package_dir={"pgsvd_rt.kernels": "kernels"},
    package_data={"pgsvd_rt.ops": ["cuda_policy.json"]},  # the measured CUDA path table
    install_requires=[
        # torch is deliberately absent: install the build you want first (CPU or CUDA).
        "transformers>=4.56",
        "safetensors>=0.4",
        "gguf>=0.10",
        "accelerate>=1.0",
        "tqdm",
        "numpy",
    ],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={
        "console_scripts": ["pgsvd=pgsvd_rt.cli:main"],
        # vLLM runs these in every process: registers quant_method "pgsvd" (nothing else).
        "vllm.general_plugins": ["pgsvd = pgsvd_rt.integrations:register_vllm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
