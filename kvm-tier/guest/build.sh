#!/usr/bin/env bash
# Builds dormant's guest image: the kernel (build-kernel.sh) and an uncompressed initramfs with
# Debian's busybox-static, the guest agent (a static Rust binary) and guest/init. Both are cached
# by content hash under $DORMANT_CACHE/guest; $DORMANT_CACHE/guest/current/{vmlinux,initramfs.cpio}
# point at the latest build, which is where dormant looks by default.
#
#   DORMANT_CACHE   cache root (default ~/.cache/dormant)
set -euo pipefail
# One function, parsed before it runs: editing the file during a build is safe.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
main() {
    local root cache log
    root="$(cd "$here/../.." && pwd)"
    cache="${DORMANT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dormant}/guest"
    log() { echo "$@" >&2; }

    local kernel
    kernel="$("$here/build-kernel.sh")"

    local need=()
    dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
    command -v cpio >/dev/null || need+=(cpio)
    if ((${#need[@]})); then
        log "==> installing guest image dependencies: ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2 ||
            { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2; }
    fi

    log "==> building the guest agent (static)"
    RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" cargo build --quiet --release \
        --manifest-path "$root/Cargo.toml" -p dormant-agent \
        --target x86_64-unknown-linux-gnu --target-dir "$root/target/guest" >&2
    local agent="$root/target/guest/x86_64-unknown-linux-gnu/release/dormant-agent"

    local hash
    hash="$(cat /bin/busybox "$agent" "$here/init" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
    local initramfs="$cache/initramfs-$hash.cpio"
    if [[ ! -f "$initramfs" ]]; then
        log "==> assembling the initramfs"
        work="$(mktemp -d "$cache/.build-initramfs.XXXXXX")"
        trap 'rm -rf "${work:-}"' EXIT
        mkdir -p "$work/root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,var/www,run}
        cp /bin/busybox "$work/root/bin/busybox"
        local applet
        for applet in $(/bin/busybox --list-full); do
            [[ -e "$work/root/$applet" ]] || ln -s /bin/busybox "$work/root/$applet"
        done
        cp "$agent" "$work/root/sbin/dormant-agent"
        install -m 0755 "$here/init" "$work/root/init"
        printf 'root:x:0:0:root:/root:/bin/sh\n' > "$work/root/etc/passwd"
        printf 'root:x:0:\n' > "$work/root/etc/group"
        printf '127.0.0.1 localhost dormant\n' > "$work/root/etc/hosts"
        (cd "$work/root" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc --owner 0:0) > "$work/initramfs.cpio"
        mv "$work/initramfs.cpio" "$initramfs"
    fi

    mkdir -p "$cache/current.tmp"
    ln -sfn "$kernel" "$cache/current.tmp/vmlinux"
    ln -sfn "$initramfs" "$cache/current.tmp/initramfs.cpio"
    rm -rf "$cache/current"
    mv "$cache/current.tmp" "$cache/current"
    # Older initramfs builds are cheap to remake: keep only the current one.
    find "$cache" -maxdepth 1 -name 'initramfs-*.cpio' ! -name "$(basename "$initramfs")" -delete
    log "==> guest image: $cache/current (kernel $(basename "$(dirname "$kernel")"), $(basename "$initramfs"))"
}
main "$@"; exit $?
