# One image for every inferq actor: edge, worker, autoscaler, agent.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY actors actors
COPY broker broker
COPY runtime runtime
COPY edge edge
COPY configs configs
RUN pip install --no-cache-dir . && useradd --create-home inferq && mkdir -p /models /state && chown inferq /models /state
USER inferq
ENV INFERQ_MODEL_REPOSITORY=/models INFERQ_STATE_DIR=/state
ENTRYPOINT ["inferq"]
