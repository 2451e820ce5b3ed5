#!/usr/bin/env bash
# Wheels for a GPU machine that reaches no package registry (the lent H200: Python 3.12, x86_64, torch,
# torchvision and accelerate installed). Run here, where pip reaches PyPI:
#
#   bash benchmarks/wheelhouse.sh [DIR]      # default .wheelhouse (git-ignored); emptied first
#
# DIR then holds, for CPython 3.12 on manylinux x86_64: the project itself and the packages it needs
# beyond what that machine has, each dependency included, one version of each. benchmarks/run_gpu.sh
# installs the ones the machine lacks with `pip install --no-index --no-deps` before it starts.
# What the machine has is the list below (KINDS.md of the device tool, read 2026-11-17): rich,
# safetensors and pyyaml are on it, so they are fetched only as a fallback, and the run installs a
# wheel only when its distribution is missing there. wandb (~19 MiB) is included because the whole
# folder stays under 60 MiB (checked below), although the quick check does not need it (its tests
# train with tracking.tracker=none); WANDB=0 leaves it out.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-$repo/.wheelhouse}
py=${PYTHON:-python3}
limit_mib=60
# The project's runtime packages beyond torch, torchvision and accelerate, at the versions tested here.
packages=(webdataset==1.0.2 rich==15.0.0 safetensors==0.8.0 pyyaml==6.0.4)
left_out=  # requirements that may be missing (the project's wandb with WANDB=0)
if [ "${WANDB:-1}" = 0 ]; then left_out=wandb; else packages+=(wandb==0.31.0); fi
target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Distributions already on the GPU machine (names normalised: lower case, '_' for '-' and '.').
on_gpu_machine="absl_py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated_doc anyio attrs botorch
build certifi charset_normalizer chex click cloudpickle cmake colorama contourpy coverage cuda_bindings cuda_core
cuda_pathfinder cuda_toolkit cupy_cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf_xet httpcore httpx huggingface_hub humanize
hypothesis idna imageio iniconfig interface_meta jax jax_cuda13_pjrt jax_cuda13_plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy_loader lightning lightning_utilities linear_operator lineax llvmlite lxml markdown
markdown_it_py markupsafe matplotlib mdurl meson ml_dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy_extensions nanobind narwhals networkx ninja numba numba_cuda numpy numpyro nvidia_cublas nvidia_cuda_cupti
nvidia_cuda_nvrtc nvidia_cuda_runtime nvidia_cudnn_cu13 nvidia_cufft nvidia_cufile nvidia_curand nvidia_cusolver
nvidia_cusparse nvidia_cusparselt_cu13 nvidia_ml_py nvidia_nccl_cu13 nvidia_nvjitlink nvidia_nvshmem_cu13
nvidia_nvtx onnx onnx_ir onnxruntime onnxscript opencv_python_headless optax opt_einsum opt_einsum_fx optimistix
orbax_checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus_client propcache
protobuf psutil pyarrow pybind11 py_cpuinfo pygments pyparsing pyproject_hooks pyre_extensions pytest
pytest_benchmark pytest_cov pytest_mock pytest_timeout pytest_xdist python_dateutil pytorch_lightning pyyaml regex
requests rich sacrebleu safetensors scikit_build_core scikit_image scikit_learn scipy seaborn sentencepiece
sentence_transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard_data_server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch_geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing_extensions typing_inspect urllib3 uvloop wadler_lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
fallback="rich safetensors pyyaml"  # on the machine, but listed in the project's needs: carried all the same

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
rm -rf "$dir"
mkdir -p "$dir"
# The project: pure Python, built from a copy of this tree's package (setuptools would leave build/
# and *.egg-info in the tree). The run itself imports the tree; the wheel lets
# `pip install --no-index --find-links DIR gastro-dist` work there too.
mkdir "$staging/project"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/gastro_dist" "$staging/project/"
"$py" -m pip wheel -q --no-deps --wheel-dir "$dir" "$staging/project"
# Every dependency, resolved for the target (not for this machine), then only what the GPU machine lacks.
"$py" -m pip download -q "${target[@]}" --dest "$staging" "${packages[@]}"
for wheel in "$staging"/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z.-' 'a-z__')
    if [[ " $fallback " == *" $name "* ]] || [[ " $(echo $on_gpu_machine) " != *" $name "* ]]; then
        cp "$wheel" "$dir/"
    fi
done

# Each wheel's requirements (for Python 3.12 on Linux, extras aside) must be in DIR or on the machine.
"$py" - "$dir" "$on_gpu_machine $left_out" <<'EOF'
import re, sys, zipfile
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # pip's own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()

house, on_machine = Path(sys.argv[1]), set(sys.argv[2].split())
environment = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
               "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
wheels = sorted(house.glob("*.whl"))
names = [norm(w.name.split("-")[0]) for w in wheels]
duplicates = {n for n in names if names.count(n) > 1}
missing = set()
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        for line in archive.read(metadata).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                requirement = Requirement(line.split(":", 1)[1].strip())
                if requirement.marker is None or requirement.marker.evaluate(environment):
                    if norm(requirement.name) not in set(names) | on_machine:
                        missing.add(f"{requirement} (for {wheel.name})")
if duplicates or missing:
    sys.exit(f"wheelhouse incomplete: two versions of {sorted(duplicates)}; missing {sorted(missing)}")
EOF

size_kib=$(du -sk "$dir" | cut -f1)
ls -1 "$dir"
echo "$(ls "$dir" | wc -l) wheels, $(( size_kib / 1024 )) MiB in $dir"
if [ "$size_kib" -gt $(( limit_mib * 1024 )) ]; then
    echo "over $limit_mib MiB: the device tool carries 64 MiB with the working tree; try WANDB=0" >&2
    exit 1
fi
