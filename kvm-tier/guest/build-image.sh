#!/usr/bin/env bash
# Builds a root filesystem image for dormant's Linux guest: an ext4 file the guest mounts as `/`
# (its agent, booted from the initramfs, stays PID 1). Cached by content hash of the recipe under
# $DORMANT_CACHE/images; $DORMANT_CACHE/images/NAME links the latest build of NAME. Prints the
# image file's path.
#
#   build-image.sh base | coding             the built-in images (package lists in images/)
#   build-image.sh NAME --packages "P1 P2"   an image of your own: base plus these Debian packages
#   build-image.sh NAME --rootfs DIR|TAR     an image of your own from a root filesystem (a
#                                            directory, or a tar archive such as `docker export`'s)
#
# Debian images are made by mmdebstrap --variant=minbase from the suite $DORMANT_IMAGE_SUITE
# (default: stable) of the host's configured Debian mirror (deb.debian.org when none is found),
# then `mke2fs -t ext4 -d`. Needs root, apt (mmdebstrap and e2fsprogs are installed when missing).
#
#   DORMANT_CACHE           cache root (default ~/.cache/dormant)
#   DORMANT_IMAGE_SUITE     Debian suite (default stable)
#   DORMANT_IMAGE_FREE_MIB  free space left in the filesystem beyond its contents (default 2048)
set -euo pipefail
# One function, parsed before it runs: editing the file during a build is safe.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The recipe's version: bump it when the steps below change what an image holds.
RECIPE=1
# The build's scratch directory, removed on exit (global: the EXIT trap runs after main returns).
work=""
trap 'rm -rf "${work:-}"' EXIT
main() {
    local name="${1:-}"
    shift || true
    local packages="" rootfs=""
    while (($#)); do
        case "$1" in
            --packages) packages="${2:?--packages needs a list}"; shift 2 ;;
            --rootfs) rootfs="${2:?--rootfs needs a directory or a tar file}"; shift 2 ;;
            *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
        esac
    done
    if [[ ! "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ || "$name" == minimal ]]; then
        echo "build-image.sh: image name '$name': letters, digits, '.', '_', '-' (not 'minimal')" >&2
        exit 2
    fi
    local cache="${DORMANT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dormant}/images"
    local suite="${DORMANT_IMAGE_SUITE:-stable}"
    local free_mib="${DORMANT_IMAGE_FREE_MIB:-2048}"
    log() { echo "$@" >&2; }
    mkdir -p "$cache"

    # What the image is made of: its key.
    local list="$here/images/$name.packages"
    local recipe mirror=""
    if [[ -n "$rootfs" ]]; then
        [[ -z "$packages" ]] || { log "build-image.sh: --packages and --rootfs exclude each other"; exit 2; }
        if [[ -d "$rootfs" ]]; then
            recipe="rootfs-dir $(cd "$rootfs" && find . -printf '%P %s %T@ %m %U %G %l\n' | LC_ALL=C sort | sha256sum)"
        elif [[ -f "$rootfs" ]]; then
            recipe="rootfs-tar $(sha256sum < "$rootfs")"
        else
            log "build-image.sh: --rootfs $rootfs is neither a directory nor a file"; exit 2
        fi
    else
        if [[ -z "$packages" ]]; then
            [[ -f "$list" ]] || { log "build-image.sh: no built-in image '$name' (built-in: base, coding); give --packages or --rootfs"; exit 2; }
        fi
        mirror="$(host_mirror)"
        recipe="debian $suite $mirror $(all_packages "$list" "$packages")"
    fi
    local hash
    hash="$( { echo "recipe $RECIPE free $free_mib"; echo "$recipe"; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)"
    local dir="$cache/$name-$hash"
    local image="$dir/rootfs.ext4"

    exec 9>"$cache/.$name.lock"
    flock 9
    if [[ ! -f "$image" ]]; then
        need_tools
        local start=$SECONDS
        # Scratch left by a build that was killed (no EXIT trap ran): we hold the lock.
        rm -rf "$cache/.build-$name".*
        work="$(mktemp -d "$cache/.build-$name.XXXXXX")"
        if [[ -n "$rootfs" ]]; then
            log "==> image $name: root filesystem from $rootfs"
            mkdir "$work/root"
            if [[ -d "$rootfs" ]]; then
                cp -a "$rootfs/." "$work/root/"
            else
                tar -xf "$rootfs" -C "$work/root" --numeric-owner
            fi
        else
            local all
            all="$(all_packages "$list" "$packages")"
            log "==> image $name: mmdebstrap --variant=minbase $suite from $mirror: $all"
            mmdebstrap --quiet --variant=minbase --include="${all// /,}" \
                --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
                --dpkgopt='path-include=/usr/share/doc/*/copyright' \
                --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
                "$suite" "$work/root" "$mirror" >&2
            # The image is an environment the sandbox owns: pip installs into the system
            # Python as a user expects (PEP 668's refusal is for hosts shared with apt).
            rm -f "$work"/root/usr/lib/python3*/EXTERNALLY-MANAGED
            rm -rf "$work"/root/var/cache/apt/archives/*.deb "$work"/root/var/lib/apt/lists/*
        fi
        finish_root "$work/root"
        local used_kib size_mib
        used_kib="$(du -sk --apparent-size "$work/root" | cut -f1)"
        # Contents + 10% for ext4's metadata + the free space, in whole 64 MiB.
        size_mib=$(( (used_kib * 11 / 10 / 1024 + free_mib + 63) / 64 * 64 ))
        log "==> image $name: ext4 of $size_mib MiB ($((used_kib / 1024)) MiB of files)"
        # No journal: a checkpoint quiesces the guest and its disk together, so the filesystem
        # is always consistent with the memory it is resumed with; a journal would only cost
        # the guest (emulated kernel code) writes and wake-ups.
        mke2fs -q -F -t ext4 -O ^has_journal -b 4096 -m 0 -L dormant-root -E root_owner=0:0 \
            -d "$work/root" "$work/rootfs.ext4" "${size_mib}M" >&2
        mkdir -p "$work/out"
        mv "$work/rootfs.ext4" "$work/out/rootfs.ext4"
        printf '{"name":"%s","hash":"%s","size_mib":%d,"files_mib":%d,"build_seconds":%d,"recipe":%d}\n' \
            "$name" "$hash" "$size_mib" "$((used_kib / 1024))" "$((SECONDS - start))" "$RECIPE" \
            > "$work/out/image.json"
        rm -rf "$dir"
        mv "$work/out" "$dir"
        log "==> image $name built in $((SECONDS - start)) s: $image"
    fi
    ln -sfn "$(basename "$dir")" "$cache/$name.tmp"
    mv -T "$cache/$name.tmp" "$cache/$name"
    # Older builds of this image are cheap to remake: keep only the current one.
    find "$cache" -maxdepth 1 -name "$name-*" ! -name "$(basename "$dir")" -exec rm -rf {} +
    echo "$image"
}

# The packages of an image: the `base` list (what every Debian image holds; minbase already
# has bash, coreutils, findutils, grep, sed, tar, gzip), the image's list file, the extra ones;
# each once, in that order.
all_packages() {
    { list_packages "$here/images/base.packages"; echo; list_packages "$1"; echo; echo "$2"; } |
        tr -s ' \n' '\n\n' | awk 'NF && !seen[$0]++' | paste -sd' ' -
}

# A package list file: one package per line, `#` comments (nothing when there is no such file).
list_packages() {
    [[ -f "$1" ]] || return 0
    sed -e 's/#.*//' "$1" | tr -s ' \n' ' ' | sed -e 's/^ //' -e 's/ $//'
}

# The Debian mirror the host's apt uses (deb822 or one-line sources), else deb.debian.org.
host_mirror() {
    local uri
    uri="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' |
        grep -E '/debian/?$' | head -n1 || true)"
    [[ -n "$uri" ]] || uri="$(grep -hE '^deb +(\[[^]]*\] +)?https?://[^ ]*/debian/? ' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}' | head -n1 || true)"
    echo "${uri:-http://deb.debian.org/debian}"
}

need_tools() {
    local need=()
    command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
    command -v mke2fs >/dev/null || [[ -x /sbin/mke2fs ]] || need+=(e2fsprogs)
    if ((${#need[@]})); then
        if [[ "$(id -u)" != 0 ]]; then
            echo "build-image.sh: needs ${need[*]} (apt-get install ${need[*]}) and root" >&2
            exit 1
        fi
        echo "==> installing image build dependencies: ${need[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2 ||
            { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2; }
    fi
    [[ "$(id -u)" == 0 ]] || { echo "build-image.sh: building an image needs root" >&2; exit 1; }
}

# What dormant's guest expects of any root filesystem: the mount points its agent uses, a root
# user with a home, and a hosts file.
finish_root() {
    local r="$1"
    mkdir -p "$r"/{proc,sys,dev,tmp,run,root,data,etc,mnt}
    chmod 1777 "$r/tmp"
    chmod 0700 "$r/root"
    grep -q '^root:' "$r/etc/passwd" 2>/dev/null || printf 'root:x:0:0:root:/root:/bin/sh\n' >> "$r/etc/passwd"
    grep -q '^root:' "$r/etc/group" 2>/dev/null || printf 'root:x:0:\n' >> "$r/etc/group"
    printf '127.0.0.1 localhost dormant\n::1 localhost\n' > "$r/etc/hosts"
    echo dormant > "$r/etc/hostname"
    # Nothing in the guest resolves names yet (no network); an empty resolv.conf says so.
    rm -f "$r/etc/resolv.conf"
    : > "$r/etc/resolv.conf"
}
main "$@"; exit $?
