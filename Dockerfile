# syntax=docker/dockerfile:1
# reverse-etl in a small image: the CLI as ENTRYPOINT, run as a non-root user (uid 10001)
# against a project directory mounted at /project; secrets come from the environment.
#
#   docker build -t reverse-etl .                                    # extras: postgres,s3
#   docker build -t reverse-etl --build-arg EXTRAS=postgres,s3,snowflake .
#   docker run --rm -v "$PWD:/project" --user "$(id -u):$(id -g)" \
#       -e KLAVIYO_API_KEY -e DOTDIGITAL_API_USER -e DOTDIGITAL_API_PASSWORD \
#       -e REVERSE_ETL_STATE_URL reverse-etl run --due
#
# The install steps are scripts/image-install.sh, which tests/test_deploy.py runs against the
# wheel of the tree: see deploy/README.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the wheel, then a virtualenv holding it and its extras at the pinned versions
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY reverse_etl ./reverse_etl
RUN python -m pip wheel --quiet --no-deps --wheel-dir /dist .
COPY constraints.txt scripts/image-install.sh ./
# postgres: the PostgreSQL state store (and source); s3: s3:// error files. Add a warehouse's
# extra (snowflake, bigquery) when the project reads one. The sandbox extra is for the demo only.
ARG EXTRAS=postgres,s3
RUN EXTRAS="${EXTRAS}" sh image-install.sh /dist/reverse_etl-*.whl /opt/reverse-etl constraints.txt

# ---- runtime: the same base, the virtualenv, no compiler, no pip in the venv, no root
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="reverse-etl" \
      org.opencontainers.image.description="Warehouse views to Klaviyo and Dotdigital" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 reverse-etl \
    && useradd --system --uid 10001 --gid reverse-etl --create-home \
       --home-dir /home/reverse-etl --shell /usr/sbin/nologin reverse-etl \
    && mkdir /project && chown reverse-etl:reverse-etl /project
COPY --from=build /opt/reverse-etl /opt/reverse-etl
ENV PATH=/opt/reverse-etl/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    REVERSE_ETL_PROJECT_DIR=/project
WORKDIR /project
# numeric, so Kubernetes' runAsNonRoot can verify it
USER 10001:10001
ENTRYPOINT ["reverse-etl"]
CMD ["--help"]
