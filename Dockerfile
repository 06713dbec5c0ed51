# syntax=docker/dockerfile:1
# One image for every dpe service; docker-compose.yml picks the subcommand (ENTRYPOINT is `dpe`).
#
#   docker build -t dpe-stream .                      # CPU build of torch (the default)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t dpe-stream:cuda .
FROM python:3.11-slim

# torch goes in first, pinned, from the chosen wheel index; the later `pip install .` is then
# constrained to that exact version, so no dependency can swap in a (multi-GB) CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The source is bind-mounted for the install only, so no copy of it stays in an image layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,target=/src,rw \
    echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt /src \
    && rm /tmp/torch-constraint.txt

# Folders the compose volumes mount over: created here so new named volumes belong to `dpe`.
RUN useradd --create-home --uid 10001 --user-group dpe \
    && mkdir -p /data/blobs /data/home/checkpoints /data/inbox /etc/dpe \
    && chown -R dpe:dpe /data

USER dpe
WORKDIR /home/dpe
ENTRYPOINT ["dpe"]
CMD ["--help"]
