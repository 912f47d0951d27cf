#!/usr/bin/env bash
# Writes a tiny busybox root filesystem tarball, from this host's
# busybox-static, for `quilt image import --name busybox OUT.tar`. Used by the
# quick start and by deploy/sim to give a fresh worker its first image.
# Usage: deploy/busybox-image.sh OUT.tar
set -euo pipefail
out=${1:?usage: busybox-image.sh OUT.tar}
busybox=$(command -v busybox) || {
  echo "busybox-image: busybox is missing (apt-get install -y busybox-static)" >&2
  exit 1
}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,proc,dev,sys,tmp,etc,root}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\n' >"$rootfs/etc/group"
tar -C "$rootfs" -cf "$out" .
