#!/usr/bin/env bash
# Quilt quick start: install what is missing, build Quilt, make a tiny
# busybox root filesystem, and run a command in an isolated, limited
# container. Run as root. With arguments, runs them instead of the demo:
#   sudo deploy/quickstart.sh /bin/sh -c 'echo hi; cat /proc/self/status'
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "quickstart: containers need root; run: sudo $0 $*" >&2
  exit 1
fi
if ! command -v busybox >/dev/null 2>&1; then
  echo "== installing busybox-static (the demo's root filesystem)"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static
fi

echo "== building quilt (release)" >&2
cargo build --release --locked --bin quilt >&2

data_dir=${QUILT_DATA_DIR:-/var/lib/quilt}
rootfs="$data_dir/rootfs/busybox"
if [ ! -x "$rootfs/bin/busybox" ]; then
  echo "== making a busybox root filesystem in $rootfs" >&2
  mkdir -p "$rootfs"/{bin,proc,dev,sys,tmp,etc,root}
  cp "$(command -v busybox)" "$rootfs/bin/busybox"
  for applet in $("$rootfs/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$rootfs/etc/passwd"
  printf 'root:x:0:\n' > "$rootfs/etc/group"
fi

if [ $# -eq 0 ]; then
  set -- /bin/sh -c 'echo "hello from $(hostname), pid $$"; echo "processes I can see: $(echo /proc/[0-9]*)"; echo "network interfaces: $(ls /sys/class/net)"; grep -E "^(CapEff|NoNewPrivs|Seccomp):" /proc/self/status'
fi
echo "== quilt run --local --rootfs $rootfs --memory 64M --pids 64 --timeout 10s -- $*" >&2
exec target/release/quilt --data-dir "$data_dir" run --local --rootfs "$rootfs" \
  --memory 64M --pids 64 --timeout 10s -- "$@"
