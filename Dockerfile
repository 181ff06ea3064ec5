# The maas image: `maas serve` on CPU, as a non-root user. Build: docker build -t maas:0.1.0 .
# Extras (e.g. Ray Serve): docker build --build-arg EXTRAS=ray -t maas:0.1.0-ray .
# No secret is baked in: the registry's URLs and keys come from the environment at run time (a Kubernetes Secret;
# `maas deploy-manifest --target kubernetes` writes the manifests).

FROM python:3.11-slim AS build
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
# torch from PyTorch's CPU index (2.13.0+cpu satisfies constraints.txt's torch==2.13.0 and pulls no CUDA packages).
RUN python -m venv /opt/maas \
    && /opt/maas/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        -c constraints.txt ".${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim
RUN groupadd --system --gid 10001 maas \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/maas --create-home --shell /usr/sbin/nologin maas
COPY --from=build /opt/maas /opt/maas
ENV PATH=/opt/maas/bin:$PATH \
    MAAS_HOME=/var/lib/maas \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/maas
# REST (Open Inference Protocol, OpenAI-compatible, admin, /metrics) and gRPC.
EXPOSE 8000 8001
# Off loopback, API keys are required (MAAS_AUTH=auto); create them with `maas keys create` against the same registry.
ENTRYPOINT ["maas"]
CMD ["serve", "--host", "0.0.0.0"]
