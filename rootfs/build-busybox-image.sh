#!/bin/bash
# Build the small image pytest-isolate's tests run in, from Debian's busybox-static.
#
#   rootfs/build-busybox-image.sh OUTPUT.tar.gz     (or .tar, .tgz, .tar.xz, .tar.bz2)
#
# The result is a root file system of about 2 MB: /bin/busybox with every applet as a
# symlink beside it (sh, cat, ls, echo, ...), /usr/bin/env as an absolute symlink (as
# images have, and as `#!/usr/bin/env` shebangs need), /etc/os-release with
# ID=isolate-busybox, /etc/passwd and /etc/group, and the empty mount points a
# container runtime fills: /proc, /sys, /dev, /tmp, /run.
#
# The archive is reproducible (sorted names, numeric owner 0:0, every mtime set to the
# busybox binary's, gzip without a timestamp): the same busybox gives the same bytes,
# so pytest-isolate's content-keyed cache unpacks it once, however often it is rebuilt.
# No binary image is committed to the repository; this script is the recipe.
#
# Environment: BUSYBOX=/path/to/a/static/busybox (default /bin/busybox, from
# `apt-get install busybox-static`).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTPUT.tar[.gz|.xz|.bz2]" >&2
    exit 2
fi
output=$(realpath -m -- "$1")  # absolute: the script changes directory below
busybox=${BUSYBOX:-/bin/busybox}

if [ ! -x "$busybox" ]; then
    echo "error: $busybox not found; fix: apt-get install busybox-static, or set BUSYBOX" >&2
    exit 2
fi
# The image has no libc: a dynamically linked busybox would not start inside it.
case "$(ldd "$busybox" 2>&1 || true)" in
    *"not a dynamic executable"*|*"statically linked"*) ;;
    *)
        echo "error: $busybox is dynamically linked; fix: apt-get install busybox-static" >&2
        exit 2
        ;;
esac
case "$output" in
    *.tar.gz|*.tgz) compress=(gzip -9 -n) ;;
    *.tar.xz|*.txz) compress=(xz -6 -T1) ;;
    *.tar.bz2|*.tbz2) compress=(bzip2 -9) ;;
    *.tar) compress=(cat) ;;
    *)
        echo "error: $output: unknown suffix; use .tar, .tar.gz, .tgz, .tar.xz or .tar.bz2" >&2
        exit 2
        ;;
esac

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
umask 022
cd "$stage"

mkdir -p bin etc dev proc sys tmp run root home usr/bin var/tmp
install -m 0755 "$busybox" bin/busybox
for applet in $(bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "bin/$applet"
done
ln -s /bin/busybox usr/bin/env

version=$(bin/busybox | sed -n '1s/^BusyBox v\([^ ]*\).*/\1/p')
cat > etc/os-release <<EOF
ID=isolate-busybox
NAME="pytest-isolate busybox"
VERSION_ID="${version:-unknown}"
PRETTY_NAME="pytest-isolate test image (BusyBox ${version:-unknown})"
EOF
cat > etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat > etc/group <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
cat > etc/hosts <<'EOF'
127.0.0.1	localhost
::1	localhost
EOF
echo isolate > etc/hostname

chmod 0755 .
chmod 1777 tmp var/tmp
chmod 0700 root
chmod 0555 proc sys

mtime=$(stat -c %Y "$busybox")
partial="$output.partial.$$"
tar --sort=name --mtime="@$mtime" --owner=0 --group=0 --numeric-owner --format=gnu \
    -C "$stage" -cf - . | "${compress[@]}" > "$partial"
mv -f "$partial" "$output"  # atomic: a reader never sees half an image
echo "$output"
