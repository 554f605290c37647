# syntax=docker/dockerfile:1
# The convolution service as an image: `docker compose up --build` (docker-compose.yml), or
#   docker build -t convcore-service . && docker run -p 50051:50051 -v models:/models convcore-service
#
# builder: compiles convcore (Cython + OpenMP) and generates the gRPC stubs into wheels. CONVCORE_NO_NATIVE=1 drops
#          -march=native, so the image runs on any x86-64 host, not only on CPUs like the build machine's.
# runtime: python slim + those wheels + libgomp (OpenMP's runtime); no compiler, runs as a non-root user.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV CONVCORE_NO_NATIVE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto/ proto/
COPY convcore/ convcore/
COPY server/ server/
COPY client/ client/
# EXTRAS=plot adds matplotlib, for `python -m client.loadtest --plot` inside the container.
ARG EXTRAS=""
RUN pip wheel --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# The wheels are bind-mounted from the builder, not copied: no layer keeps them. --no-index: nothing else is fetched.
ARG EXTRAS=""
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    pip install --no-index --find-links /wheels "convcore-service${EXTRAS:+[$EXTRAS]}" \
    && python -c "import convcore, server, server.healthcheck, client.loadtest"
# /models and /results belong to the service user, so named volumes mounted there (initialised from the image)
# are writable without running as root.
RUN groupadd --system --gid 10001 conv \
    && useradd --system --uid 10001 --gid conv --home-dir /app --create-home conv \
    && mkdir -p /models /results \
    && chown conv:conv /models /results
USER conv
WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    CONVSERVICE_MODEL_REPOSITORY=/models
VOLUME ["/models"]
# 50051: gRPC (our service, KServe v2, health, reflection); 8002: Prometheus metrics.
EXPOSE 50051 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "server.healthcheck", "--port", "50051"]
CMD ["python", "-m", "server", "--host", "0.0.0.0", "--port", "50051", \
     "--model-repository", "/models", "--metrics-port", "8002"]
