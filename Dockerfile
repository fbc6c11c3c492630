# One image for every inferq actor: edge, worker, autoscaler, agent.
#
# The base is a build argument: any Debian-like image with python3 (>= 3.11) and its venv module.
#   docker build -t inferq .                                        # python:3.11-slim from Docker Hub
#   docker build --build-arg BASE_IMAGE=inferq-base:bookworm -t inferq .   # a local Debian base (make image)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY inferq inferq
COPY actors actors
COPY broker broker
COPY runtime runtime
COPY edge edge
COPY benchmarks benchmarks
COPY configs configs
# A venv: Debian's own python3 refuses system-wide pip installs (PEP 668); python:3.11-slim does not mind either way.
# The sources go once installed: workers are started as `python -m inferq.cli`, which puts the working directory
# first on sys.path, and a source folder inferq/ there (without actors/, edge/, ...) would hide the installed package.
RUN python3 -m venv /opt/inferq && /opt/inferq/bin/pip install --no-cache-dir ".[server]" \
    && rm -rf /src && useradd --create-home inferq && mkdir -p /models /state && chown inferq /models /state
ENV PATH=/opt/inferq/bin:$PATH INFERQ_MODEL_REPOSITORY=/models INFERQ_STATE_DIR=/state
WORKDIR /state
USER inferq
ENTRYPOINT ["inferq"]
