"""Build: the convcore Cython extensions (OpenMP when the compiler has it) and the gRPC stubs from proto/.

Environment switches:
  CONVCORE_NO_OPENMP=1    build without OpenMP (everything still works, sequentially)
  CONVCORE_DEBUG=1        Cython bounds/wraparound checks on, -O0 -g (for a debug run)
  CONVCORE_NO_NATIVE=1    do not compile with -march=native (portable wheels / container images). The GEMM
                          micro-kernels (convcore/_gemm.h) do not depend on it: each CPU level is compiled with its
                          own per-function target attribute and picked at run time, so such a build runs the same
                          kernels as a native one.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Command, Extension, find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("CONVCORE_DEBUG", "") not in ("", "0")
GENERATED_PKG = "convproto"  # generated protobuf/gRPC stubs live here, never hand-edited


def _compiler_accepts(flags):
    """Probe-compile a tiny OpenMP program with `flags`; True if it compiles and links."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()
    src = "#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel reduction(+:n)\nn+=1;\nreturn n>0?0:1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(src)
        try:
            res = subprocess.run(cc + flags + [path, "-o", os.path.join(tmp, "probe")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return False
        return res.returncode == 0


def _openmp_flags():
    if os.environ.get("CONVCORE_NO_OPENMP", "") not in ("", "0"):
        print("convcore: OpenMP disabled by CONVCORE_NO_OPENMP")
        return [], []
    for flag in (["-fopenmp"], ["-Xpreprocessor", "-fopenmp"]):
        if _compiler_accepts(flag):
            return flag, flag
    print("convcore: the compiler does not accept -fopenmp; building without OpenMP (sequential)")
    return [], []


def _extensions():
    omp_compile, omp_link = _openmp_flags()
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    if not DEBUG and os.environ.get("CONVCORE_NO_NATIVE", "") in ("", "0"):
        opt += ["-march=native"]
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    exts = []
    headers = sorted(glob.glob(os.path.join("convcore", "*.h")))
    for pyx in sorted(glob.glob(os.path.join("convcore", "*.pyx"))):
        name = pyx[:-4].replace(os.sep, ".")
        # depends: the C kernels are headers the .pyx includes; without them a header edit left the old .so in place.
        exts.append(Extension(name, [pyx], include_dirs=[np.get_include()], define_macros=macros,
                              extra_compile_args=opt + omp_compile + ["-Wno-unused-function"],
                              extra_link_args=omp_link, depends=headers))
    # The SIGBUS guard of the server's shared-memory mappings (server/_shm.py); plain C, no Cython.
    shm_guard = Extension("server._shmguard", [os.path.join("server", "_shmguard.c")], extra_compile_args=["-O2"])
    directives = {
        "language_level": 3,
        "boundscheck": DEBUG,
        "wraparound": DEBUG,
        "initializedcheck": DEBUG,
        "cdivision": True,
        "embedsignature": True,
    }
    return cythonize(exts, compiler_directives=directives, quiet=True) + [shm_guard]


def _stage_protos(proto_dir, stage_dir):
    """Copy proto/ to `stage_dir/convproto/`, rewriting imports between our own files to their `convproto/` paths.

    protoc names each generated module after the path a .proto file was found at, and turns every `import "a/b.proto"`
    into `from a import b_pb2`. For the stubs to import each other as `convproto.<path>`, every path protoc sees must
    start with `convproto/`. A `-Iconvproto=proto` mapping gives that to the files named on the command line, but an
    import written the published way (Triton's grpc_service.proto says `import "model_config.proto"`, a sibling) is
    then unresolvable. So the files are staged, and only in the staged copy is such an import rewritten to
    `convproto/<dir>/model_config.proto`; proto/ itself keeps the published text. Imports that do not name one of our
    files (google/protobuf/...) are left alone.
    """
    import re

    pattern = re.compile(r'^(\s*import\s+(?:public\s+|weak\s+)?")([^"]+)(";)', re.MULTILINE)
    staged = []
    for path in sorted(glob.glob(os.path.join(proto_dir, "**", "*.proto"), recursive=True)):
        rel = os.path.relpath(path, proto_dir).replace(os.sep, "/")
        rel_dir = os.path.dirname(rel)

        def rewrite(match, rel_dir=rel_dir):
            target = match.group(2)
            for candidate in (os.path.normpath(os.path.join(rel_dir, target)).replace(os.sep, "/"), target):
                if os.path.isfile(os.path.join(proto_dir, candidate)):
                    return f"{match.group(1)}{GENERATED_PKG}/{candidate}{match.group(3)}"
            return match.group(0)

        with open(path, encoding="utf-8") as f:
            text = pattern.sub(rewrite, f.read())
        dest = os.path.join(stage_dir, GENERATED_PKG, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "w", encoding="utf-8") as f:
            f.write(text)
        staged.append(f"{GENERATED_PKG}/{rel}")
    return staged


def generate_stubs():
    """Generate the protobuf/gRPC Python stubs from proto/ into the convproto package.

    Every file under proto/ becomes `convproto.<path>_pb2` (+ `_pb2_grpc`, `.pyi`), one importable package apart from
    hand-written code, never edited by hand. See `_stage_protos` for how imports between the .proto files are resolved.
    """
    proto_dir = os.path.join(HERE, "proto")
    if not glob.glob(os.path.join(proto_dir, "**", "*.proto"), recursive=True):
        return
    from grpc_tools import protoc
    import grpc_tools

    out = os.path.join(HERE, GENERATED_PKG)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as stage:
        rel = _stage_protos(proto_dir, stage)
        args = ["grpc_tools.protoc", f"-I{stage}", f"-I{well_known}",
                f"--python_out={HERE}", f"--grpc_python_out={HERE}", f"--pyi_out={HERE}"] + rel
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + " ".join(rel))
    for dirpath, _dirs, _files in os.walk(out):
        init = os.path.join(dirpath, "__init__.py")
        if not os.path.exists(init):
            with open(init, "w") as f:
                f.write("# Generated by setup.py from proto/; do not edit.\n")


class GenerateStubs(Command):
    description = "generate protobuf/gRPC stubs from proto/ into convproto/"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        generate_stubs()


class BuildPyWithStubs(build_py):
    def run(self):
        generate_stubs()
        # find_packages ran before the stubs existed: add the generated packages now.
        pkgs = set(self.distribution.packages or [])
        pkgs.update(find_packages(HERE, include=[GENERATED_PKG, GENERATED_PKG + ".*"]))
        self.distribution.packages = sorted(pkgs)
        self.packages = self.distribution.packages
        super().run()


# Generate early too, so that an editable install (which may not copy packages) finds the stubs in the tree.
if any(cmd in sys.argv for cmd in ("build_py", "build", "bdist_wheel", "editable_wheel", "develop", "install")):
    generate_stubs()

setup(
    name="convcore-service",
    version="0.1.0",
    description="Convolution inference microservice: a Cython/OpenMP im2col+GEMM engine behind gRPC (KServe v2 compatible)",
    python_requires=">=3.10",
    packages=find_packages(HERE, include=["convcore", "convcore.*", "server", "server.*", "client", "client.*",
                                          "benchmarks", "benchmarks.*", GENERATED_PKG, GENERATED_PKG + ".*"]),
    package_data={"convcore": ["*.pxd", "*.pyx"]},
    ext_modules=_extensions(),
    cmdclass={"build_py": BuildPyWithStubs, "generate_stubs": GenerateStubs},
    install_requires=[
        "numpy>=1.26",
        "scipy>=1.11",
        "threadpoolctl>=3.1",
        # The stubs in convproto/ are generated at build time by the newest grpcio-tools (1.85.x -> protobuf 7.35
        # gencode), and generated code refuses an older runtime: keep these floors at the generator's versions.
        "grpcio>=1.85.1",
        "grpcio-health-checking>=1.85.1",
        "grpcio-reflection>=1.85.1",
        "protobuf>=7.35.1",
        "prometheus-client>=0.21",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "pyyaml>=6", "kubernetes-validate>=1.34", "torch==2.13.0", "onnx>=1.15", "onnxruntime>=1.17", "matplotlib>=3.7"],
        "bench": ["torch==2.13.0", "onnx>=1.15", "onnxruntime>=1.17"],
        "plot": ["matplotlib>=3.7"],
        # Profiling the server under load (BENCHMARKS.md, "Serving path"): py-spy record -p PID [--gil|--idle].
        "profile": ["py-spy>=0.3"],
        # ConvClient.register_onnx / register_torch import these only when called (issue 12).
        "onnx": ["onnx>=1.15"],
        "torch": ["torch>=2.0"],
    },
    zip_safe=False,
)
