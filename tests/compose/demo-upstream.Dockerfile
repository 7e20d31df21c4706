# The Rocket.Chat stand-in of the compose tests: tests/support/rocketchat_demo.py (the demo
# upstream every end-to-end test runs against) under the host's Debian python3, copied with the
# glibc files `ldd` lists for it and the standard library modules it can import. No Python
# image can be pulled here, and nothing is compiled. Never pushed; `make clean` removes it.
FROM scratch
COPY rootfs/ /
# -B: no .pyc writes into the container; -u: unbuffered output for `docker compose logs`.
ENTRYPOINT ["/usr/bin/python3", "-B", "-u", "/app/rocketchat_demo.py"]
CMD ["--host", "0.0.0.0", "--port", "3000"]
