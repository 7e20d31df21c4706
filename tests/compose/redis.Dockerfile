# The Redis of the global compose test (envoy/docker-compose-global.yaml with
# tests/compose/global.override.yaml): Debian's redis-server and the files `ldd` lists for it,
# staged by tests/compose/images.py. Not the redis:7.4.2 the compose file names (Debian has
# another version), so the override names this image. Never pushed; `make clean` removes it.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
# The compose file's command starts with `redis-server`, as it may for the official image.
CMD ["redis-server"]
