# Stand-in for heartexlabs/label-studio:1.23.2 where no image registry answers (docker/e2e/stand-ins.sh):
# label-studio 1.23.2 from PyPI on the Tessera base image, started as the compose file expects it (port
# 8080, data in /label-studio/data, the admin user from LABEL_STUDIO_USERNAME/PASSWORD/USER_TOKEN).
# Build context: docker/e2e.  --secret id=pip_ca,src=CA-BUNDLE as for docker/Dockerfile.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/ls/bin:$PATH LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data
RUN python3 -m venv --without-pip /opt/ls
RUN --mount=type=secret,id=pip_ca \
    set -e; if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip --python /opt/ls/bin/python install --no-compile label-studio==1.23.2 \
    && groupadd --gid 1001 ls && useradd --uid 1001 --gid ls --home-dir /label-studio --create-home ls \
    && mkdir -p /label-studio/data && chown -R ls:ls /label-studio
USER 1001:1001
WORKDIR /label-studio
EXPOSE 8080
CMD ["label-studio", "start", "--host", "0.0.0.0", "--port", "8080", "--no-browser"]
