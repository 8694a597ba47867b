# syntax=docker/dockerfile:1
# tfserver image: terraform pinned and checksum-verified, the served modules' providers in a
# filesystem mirror (the running container never downloads one), a non-root user, and no
# secret in any layer (credentials arrive as runtime environment variables only).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- terraform, verified ------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS terraform
ARG TERRAFORM_VERSION=1.11.4
# SHA-256 of terraform_1.11.4_linux_{amd64,arm64}.zip from HashiCorp's SHA256SUMS.
ARG TERRAFORM_SHA256_AMD64=1ce994251c00281d6845f0f268637ba50c0005657eb3cf096b92f753b42ef4dc
ARG TERRAFORM_SHA256_ARM64=a43d1d0da9b9bab214a8305a39db0e40869572594ccf50c416a7756499143633
ARG TARGETARCH=amd64
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Build-stage tools only (nothing of them reaches the runtime image); the artefact that
# matters, terraform itself, is pinned and checksum-verified below.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl unzip \
 && rm -rf /var/lib/apt/lists/*
RUN case "${TARGETARCH}" in \
      amd64) sum="${TERRAFORM_SHA256_AMD64}" ;; \
      arm64) sum="${TERRAFORM_SHA256_ARM64}" ;; \
      *) echo "unsupported architecture ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
 && curl -fsSLo /tmp/terraform.zip \
      "https://releases.hashicorp.com/terraform/${TERRAFORM_VERSION}/terraform_${TERRAFORM_VERSION}_linux_${TARGETARCH}.zip" \
 && echo "${sum}  /tmp/terraform.zip" | sha256sum -c - \
 && unzip -q -d /usr/local/bin /tmp/terraform.zip terraform \
 && rm /tmp/terraform.zip \
 && terraform version

# -- providers of the served modules, mirrored at build time --------------------------------
FROM terraform AS providers
COPY modules/ /build/modules/
# Each module folder, and each version folder of a versioned module (modules/droplet/1.1.0/).
RUN for module in /build/modules/*/ /build/modules/*/*/; do \
      if [ -n "$(find "${module}" -maxdepth 1 -name '*.tf' -print -quit)" ]; then \
        terraform -chdir="${module}" providers mirror /opt/tf-mirror; \
      fi; \
    done

# -- the Python package as wheels -----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY tfserver/ tfserver/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- the runtime ----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# tini runs as PID 1: it reaps what terraform's runs leave orphaned (a provisioner's child
# after a cancel) and passes SIGTERM on. tfserver as PID 1 would leave those as zombies.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin tfserver \
 && install -d -o tfserver -g tfserver -m 0700 /var/lib/tfserver
COPY --from=terraform /usr/local/bin/terraform /usr/local/bin/terraform
COPY --from=providers /opt/tf-mirror /opt/tf-mirror
COPY --from=wheels /wheels /wheels
# Only the wheels built above (--no-index); their versions are setup.cfg's pinned ranges.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links=/wheels tfserver \
 && rm -rf /wheels
COPY modules/ /app/modules/
# The governance policy (deploy/app points TFSERVER_POLICY at it); read-only like the modules.
COPY deploy/policy.toml /app/policy.toml
ENV PYTHONUNBUFFERED=1 \
    TFSERVER_HOST=0.0.0.0 \
    TFSERVER_PORT=8000 \
    TFSERVER_MODULES_DIR=/app/modules \
    TFSERVER_STATE_DIR=/var/lib/tfserver \
    TFSERVER_PROVIDER_MIRROR=/opt/tf-mirror
USER 10001:10001
WORKDIR /var/lib/tfserver
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TFSERVER_PORT', '8000') + '/healthz', timeout=4)"]
# Listening on 0.0.0.0 requires TFSERVER_AUTH=jwt (COGNITO_ISSUER): without it tfserver
# refuses to start, so an unauthenticated container cannot happen by accident.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["tfserver"]
