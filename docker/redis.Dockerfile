# A Redis image from Debian's package, for hosts that cannot pull the official one:
#   docker build -f docker/redis.Dockerfile --build-arg BASE=kiln-base:bookworm -t kiln-redis docker
#   KILN_REDIS_IMAGE=kiln-redis docker compose -f docker/compose.yaml up -d
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* && mkdir /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--dir", "/data"]
