# The Rate Limit Service of the global compose test, in place of envoyproxy/ratelimit (which
# cannot be pulled here): the reference engine `make engine` builds (tools/ratelimit-engine,
# the same gRPC API and Redis counting) and the files `ldd` lists for it, staged by
# tests/compose/images.py. tests/compose/global.override.yaml names this image and gives it its
# command line. Never pushed; `make clean` removes it.
FROM scratch
COPY rootfs/ /
ENTRYPOINT ["/usr/local/bin/ratelimit-engine"]
