"""Builds the torch-free native library ``fastclip_kernels._C`` from csrc/ (metadata: pyproject.toml).

Environment:
    FASTCLIP_BUILD_CUDA   "1": build the CUDA kernels (an error without nvcc); "0": CPU only;
                          unset or "auto": CUDA iff nvcc is found (CUDA_HOME/bin, CUDA_PATH/bin, PATH).
    FASTCLIP_CUDA_ARCHS   ";"-separated SM list for nvcc -gencode, default "80;90a"; PTX of the newest
                          plain arch is embedded too (see ``gencode_targets``).

The CUDA objects link the static CUDA runtime (hidden inside _C), so the library needs only the driver.
"""

import glob
import os
import re
import shutil
import subprocess

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

CUDART = "libcudart_static.a"


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def nvcc_for_build() -> str | None:
    """nvcc to use, or None for a CPU-only build, per FASTCLIP_BUILD_CUDA."""
    mode = os.environ.get("FASTCLIP_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        raise RuntimeError(f"FASTCLIP_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    nvcc = None if mode == "0" else find_nvcc()
    if mode == "1" and nvcc is None:
        raise RuntimeError("FASTCLIP_BUILD_CUDA=1 but no nvcc in CUDA_HOME/bin, CUDA_PATH/bin or on PATH")
    return nvcc


def gencode_targets(archs: str) -> list[str]:
    """ "80;90a" -> ["sm_80", "sm_90a", "compute_80"]: machine code for each listed arch, plus the PTX of
    the newest arch without a suffix, so GPUs newer than the list (sm_100, sm_120) JIT-compile the
    kernels instead of failing with "no kernel image". Arch-specific PTX (compute_90a) would run on
    sm_90 only, hence the plain arch. The list is stored in ``_C.build_info()["archs"]`` and
    ``fastclip_kernels._native.cuda_kernels_run_on`` reads it with the same rules."""
    cubins, plain = [], []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        if not re.fullmatch(r"\d+[af]?", arch):
            raise RuntimeError(f"FASTCLIP_CUDA_ARCHS entries look like 80 or 90a, got {arch!r} in {archs!r}")
        cubins.append(f"sm_{arch}")
        if arch.isdigit():
            plain.append(int(arch))
    if not cubins:
        raise RuntimeError(f"FASTCLIP_CUDA_ARCHS names no architecture: {archs!r}")
    return cubins + ([f"compute_{max(plain)}"] if plain else [])


def gencode_flags(targets: list[str]) -> list[str]:
    """["sm_80", "compute_80"] -> -gencode arch=compute_80,code=sm_80 -gencode arch=compute_80,code=compute_80."""
    flags = []
    for target in targets:
        kind, arch = target.split("_")
        flags += ["-gencode", f"arch=compute_{arch},code={kind}_{arch}"]
    return flags


def cudart_dir(nvcc: str) -> str:
    """Folder of libcudart_static.a for this nvcc, asked from nvcc itself (it may be a wrapper)."""
    dry = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    out = dry.stdout + dry.stderr
    roots = re.findall(r"^#\$ TOP=(.*)$", out, re.M) + [
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    ]
    dirs = [d for d in re.findall(r'-L"?([^"\s]+)', out) if not d.endswith("stubs")]
    dirs += [os.path.join(r, sub) for r in roots for sub in ("lib64", "targets/x86_64-linux/lib", "lib")]
    for d in dirs:
        if os.path.isfile(os.path.join(d, CUDART)):
            return os.path.normpath(d)
    raise RuntimeError(f"{CUDART} not found for {nvcc}; looked in {dirs}")


class BuildExt(build_ext):
    def run(self):
        self.force = True  # CUDA on/off is not a file dependency: never reuse a stale _C from build/
        super().run()

    def build_extension(self, ext):
        nvcc = nvcc_for_build()
        print(f"fastclip_kernels._C: CUDA {'on (' + nvcc + ')' if nvcc else 'off'}")
        if nvcc is not None:
            archs = os.environ.get("FASTCLIP_CUDA_ARCHS", "80;90a")
            flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-Icsrc"]
            targets = gencode_targets(archs)
            flags += gencode_flags(targets)
            for src in sorted(glob.glob("csrc/cuda/*.cu")):
                obj = os.path.join(self.build_temp, "cuda", os.path.basename(src) + ".o")
                os.makedirs(os.path.dirname(obj), exist_ok=True)
                print(f"nvcc {src} -> {obj}")
                subprocess.run([nvcc, *flags, "-c", src, "-o", obj], check=True)
                ext.extra_objects.append(obj)
            ext.define_macros += [
                ("FASTCLIP_WITH_CUDA", None),
                ("FASTCLIP_CUDA_ARCHS", f'"{";".join(targets)}"'),
            ]
            ext.library_dirs.append(cudart_dir(nvcc))
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
            # Keep the static runtime's symbols private, so they never bind to torch's libcudart.
            ext.extra_link_args.append("-Wl,--exclude-libs,ALL")
        super().build_extension(ext)


ext = Pybind11Extension(
    "fastclip_kernels._C",
    sources=["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))],
    include_dirs=["csrc"],
    depends=glob.glob("csrc/**/*.h", recursive=True),
    cxx_std=17,
    extra_compile_args=["-O3"],
)

# The repository folder training/ installs as the package ``fastclip_train`` (a name of its own, not a
# generic top-level ``training``); the console scripts point there. ``python -m training.train`` keeps
# working from a checkout.
TRAIN_PACKAGES = [
    "fastclip_train" + p[len("training") :] for p in find_packages(include=["training", "training.*"])
]
setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
    packages=find_packages(include=["fastclip_kernels", "fastclip_kernels.*"]) + TRAIN_PACKAGES,
    package_dir={"fastclip_train": "training"},
)
