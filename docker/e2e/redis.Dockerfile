# Stand-in for redis:7-alpine where no image registry answers (docker/e2e/stand-ins.sh): Debian's
# redis-server on the Tessera base image, listening on every interface of its network like the real image.
FROM python:3.11-slim
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        redis-server redis-tools > /dev/null && rm -rf /var/lib/apt/lists/*
USER redis
EXPOSE 6379
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/tmp"]
