# syntax=docker/dockerfile:1
# The cluster image: Ray's image with the pinned torch build and this package installed at /home/ray/datasel-ray.
# Every node of the cluster configs runs it (cluster_configs/gpu_cluster.yaml, cluster_configs/kuberay/*.yaml).
#
#   docker build -t REGISTRY/datasel-ray:0.1.0-cu128 .                          # GPU: CUDA 12.8 torch wheel
#   docker build --build-arg VARIANT=cpu -t REGISTRY/datasel-ray:0.1.0-cpu .    # CPU: torch CPU wheel
#   docker push REGISTRY/datasel-ray:0.1.0-cu128
#
# RAY_VERSION and TORCH_VERSION are pyproject.toml's ray[...]== and torch== pins, PYTHON_TAG a Python that its
# requires-python accepts, spelled as Ray's image tags spell it (py311 = Python 3.11);
# tests/test_cluster_configs.py checks that they agree.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=gpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}

ARG RAY_VERSION
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG CUDA=cu128

# COPY before WORKDIR: the directory COPY creates belongs to ray (some builders create a WORKDIR as root), and the
# editable install writes its metadata into it.
COPY --chown=ray . /home/ray/datasel-ray
WORKDIR /home/ray/datasel-ray

# torch first, from the index of the variant: `pip install -e .` then finds torch==TORCH_VERSION satisfied and
# keeps that build (the PyPI wheel it would pick otherwise is not the one the variant asks for).
RUN case "${VARIANT}" in \
      gpu) index="${CUDA}" ;; \
      cpu) index=cpu ;; \
      *) echo "VARIANT must be gpu or cpu, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${index}" \
 && pip install --no-cache-dir -e . \
 && python -c "import ray, torch, datasel_ray; \
assert ray.__version__ == '${RAY_VERSION}', f'ray {ray.__version__}, expected ${RAY_VERSION}'; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', f'torch {torch.__version__}, expected ${TORCH_VERSION}'; \
print('ray', ray.__version__, 'torch', torch.__version__)"
