#!/usr/bin/env python3
"""`make oci`: packs the filter's .wasm as the single-layer OCI image Istio pulls a Wasm plugin
from (`WasmPlugin.spec.url: oci://...`), with no Docker engine or image tool: it writes an OCI
image layout directory (image-spec v1.1 "image-layout") by hand:

    OUT/oci-layout                  {"imageLayoutVersion": "1.0.0"}
    OUT/index.json                  one manifest, tagged (org.opencontainers.image.ref.name)
    OUT/blobs/sha256/<hex>          manifest, config, layer — each named by its own sha256

The image is the *compat* variant of the Wasm image spec that Istio's fetcher reads
(istio pkg/wasm/imagefetcher.go, solo-io/wasm spec/spec-compat.md): exactly one layer of
media type application/vnd.oci.image.layer.v1.tar+gzip holding `plugin.wasm`, and the manifest
annotation module.wasm.image/variant=compat. (The other variant Istio reads, "oci", needs two
layers; a Docker-media-type image would need a Docker tool to build.)

The bytes are reproducible: the tar entry and the gzip header carry no time, owner or name, and
JSON is written with sorted keys, so the same .wasm and tag always give the same digest.

Prints the manifest digest (sha256:...), which is what WasmPlugin.spec.sha256 takes (without
the `sha256:` prefix) and what `url: oci://REPO@sha256:...` pins. With --wasmplugin, also
writes a copy of envoy/istio/wasmplugin.yaml whose sha256 (and url, with --image) match this
image.

Push the layout with any OCI tool, no daemon needed, e.g.:
    skopeo copy --preserve-digests oci:target/oci:0.1.0 docker://REGISTRY/rocketchat-ratelimit:0.1.0
    oras cp --from-oci-layout target/oci:0.1.0 REGISTRY/rocketchat-ratelimit:0.1.0
    crane push target/oci REGISTRY/rocketchat-ratelimit:0.1.0
"""

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
WASM_FILE = "plugin.wasm"
VARIANT_ANNOTATION = "module.wasm.image/variant"


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(wasm):
    """An uncompressed tar with one entry, plugin.wasm, and nothing that varies between builds."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(WASM_FILE)
        info.size = len(wasm)
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    return buf.getvalue()


def gzip_bytes(data):
    buf = io.BytesIO()
    # mtime=0 and no file name in the header: the same input always gives the same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def build(wasm, tag, title="rocketchat-ratelimit-wasm"):
    """Returns (blobs: {digest: bytes}, manifest descriptor, index bytes)."""
    if wasm[:4] != b"\0asm":
        raise ValueError("not a WebAssembly module (no \\0asm header)")
    tar = layer_tar(wasm)
    layer = gzip_bytes(tar)
    config = canonical_json({
        # OCI takes architecture/os from Go's GOARCH/GOOS, where a WASI module is wasm/wasip1.
        "architecture": "wasm",
        "os": "wasip1",
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        "config": {},
    })
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": sha256(config), "size": len(config)},
        "layers": [{
            "mediaType": LAYER_TYPE,
            "digest": sha256(layer),
            "size": len(layer),
            "annotations": {"org.opencontainers.image.title": WASM_FILE},
        }],
        "annotations": {
            VARIANT_ANNOTATION: "compat",
            "org.opencontainers.image.title": title,
            "org.opencontainers.image.version": tag,
        },
    })
    descriptor = {
        "mediaType": MANIFEST_TYPE,
        "digest": sha256(manifest),
        "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }
    index = canonical_json({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [descriptor]})
    blobs = {sha256(b): b for b in (layer, config, manifest)}
    return blobs, descriptor, index


def write_layout(out, blobs, index):
    out = Path(out)
    # The directory is this tool's output only: start clean so no stale blob is left behind.
    if out.exists():
        shutil.rmtree(out)
    blob_dir = out / "blobs" / "sha256"
    blob_dir.mkdir(parents=True)
    for digest, data in blobs.items():
        (blob_dir / digest.split(":", 1)[1]).write_bytes(data)
    (out / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    (out / "index.json").write_bytes(index)


def fill_wasmplugin(text, digest, image=None):
    """The WasmPlugin YAML with `sha256:` (and `url:`, if an image reference is given) of the
    WasmPlugin's spec replaced; comments and layout are kept."""
    hex_digest = digest.split(":", 1)[1]
    text, n = re.subn(r"(?m)^(  sha256:)[ \t]*\S+", rf"\g<1> {hex_digest}", text, count=1)
    if n != 1:
        raise ValueError("no `  sha256:` line in the WasmPlugin")
    if image:
        text, n = re.subn(r"(?m)^(  url:)[ \t]*\S+", rf"\g<1> oci://{image}", text, count=1)
        if n != 1:
            raise ValueError("no `  url:` line in the WasmPlugin")
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wasm", required=True, help="the filter's .wasm")
    p.add_argument("--out", required=True, help="OCI layout directory to (re)create")
    p.add_argument("--tag", required=True, help="tag recorded in index.json (e.g. the crate version)")
    p.add_argument("--wasmplugin", help="WasmPlugin YAML to copy with this image's sha256")
    p.add_argument("--wasmplugin-out", help="where to write that copy (default: wasmplugin.yaml beside OUT)")
    p.add_argument("--image", help="registry/repository:tag the image will be pushed to (sets url)")
    args = p.parse_args(argv)

    wasm = Path(args.wasm).read_bytes()
    blobs, descriptor, index = build(wasm, args.tag)
    write_layout(args.out, blobs, index)
    digest = descriptor["digest"]
    if args.wasmplugin:
        dest = Path(args.wasmplugin_out or Path(args.out).parent / "wasmplugin.yaml")
        dest.write_text(fill_wasmplugin(Path(args.wasmplugin).read_text(), digest, args.image))
        print(f"WasmPlugin with this digest: {dest}", file=sys.stderr)
    print(f"OCI image layout: {args.out} (tag {args.tag}, {len(wasm)}-byte plugin.wasm)", file=sys.stderr)
    print(digest)


if __name__ == "__main__":
    main()
