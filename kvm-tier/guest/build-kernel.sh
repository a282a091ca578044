#!/usr/bin/env bash
# Builds dormant's guest kernel: Debian's linux-source-6.1 with guest/kernel/config, plus the
# patches in guest/kernel/patches-pvm/ when the host's KVM is PVM (see guest/README.md).
#
# The result is cached by content hash: $DORMANT_CACHE/guest/kernel-<hash>/vmlinux, where the
# hash covers the source package version, the config, the patches applied and RECIPE (bump it
# when the build steps below change).
# Prints the path of the vmlinux on stdout (progress goes to stderr).
#
#   DORMANT_GUEST_PVM=1|0   force the PVM patches on or off (default: on when /sys/module/kvm_pvm exists)
#   DORMANT_CACHE           cache root (default ~/.cache/dormant)
set -euo pipefail
# The whole script is one function, parsed before it runs: editing the file during a build is safe.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
main() {
    cache="${DORMANT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dormant}/guest"
    log() { echo "$@" >&2; }
    RECIPE=1

    pvm="${DORMANT_GUEST_PVM:-}"
    if [[ -z "$pvm" ]]; then
        if [[ -d /sys/module/kvm_pvm ]]; then pvm=1; else pvm=0; fi
    fi

    # Build dependencies, from Debian's archive (no-op when present).
    need=()
    [[ -f /usr/src/linux-source-6.1.tar.xz ]] || need+=(linux-source-6.1)
    for tool in flex bison bc make gcc patch; do
        command -v "$tool" >/dev/null || need+=("$tool")
    done
    command -v xz >/dev/null || need+=(xz-utils)
    [[ -f /usr/include/libelf.h ]] || need+=(libelf-dev)
    if ((${#need[@]})); then
        log "==> installing kernel build dependencies: ${need[*]}"
        command -v apt-get >/dev/null || { log "error: apt-get not found; install: ${need[*]}"; exit 1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2 ||
            { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2; }
    fi

    src_version="$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || sha256sum /usr/src/linux-source-6.1.tar.xz | cut -c1-16)"
    patches=()
    if [[ "$pvm" == 1 ]]; then
        mapfile -t patches < <(find "$here/kernel/patches-pvm" -name '*.patch' | sort)
    fi
    hash="$( {
        echo "recipe $RECIPE linux-source-6.1 $src_version"
        cat "$here/kernel/config"
        for p in "${patches[@]}"; do basename "$p"; cat "$p"; done
    } | sha256sum | cut -c1-16)"
    out="$cache/kernel-$hash"

    if [[ -f "$out/vmlinux" ]]; then
        log "==> guest kernel cached: $out/vmlinux"
        echo "$out/vmlinux"
        exit 0
    fi

    log "==> building the guest kernel (linux-source-6.1 $src_version, PVM patches: $pvm) - ~11 min on 2 cores"
    mkdir -p "$cache"
    work="$(mktemp -d "$cache/.build-kernel.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
    tree="$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -1)"
    for p in "${patches[@]}"; do
        log "    patch $(basename "$p")"
        patch -s -p1 -d "$tree" < "$p" >&2
    done
    cp "$here/kernel/config" "$tree/.config"
    make -s -C "$tree" olddefconfig >&2
    make -s -C "$tree" -j"$(nproc)" vmlinux >&2
    mkdir -p "$work/out"
    cp "$tree/vmlinux" "$work/out/vmlinux"
    cp "$tree/.config" "$work/out/config"
    printf 'linux-source-6.1 %s\npvm-patches %s\n' "$src_version" "$pvm" > "$work/out/BUILD-INFO"
    rm -rf "$out"
    mv "$work/out" "$out"
    log "==> guest kernel built: $out/vmlinux"
    echo "$out/vmlinux"
}
main "$@"; exit $?
