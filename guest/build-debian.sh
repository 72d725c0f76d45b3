#!/bin/bash
# Build the Stratus Debian 12 (bookworm) guest image: Debian's own userland, made by
# debootstrap, on the default image's kernel. Same layout as guest/build-image.sh:
#   vmlinux            the kernel, copied from $STRATUS_KERNEL_IMAGE_DIR
#   rootfs.ext4        sparse ext4 (4 KiB blocks): debootstrap --variant=minbase bookworm plus
#                      busybox-static, iproute2, iputils-ping, ca-certificates, procps;
#                      /sbin/init = guest/init, the guest agent as /usr/sbin/stratus-guest-agent
#   cmdline            the kernel command line: the default image's, unchanged
#   manifest           input hash, Debian and package versions, checksums
#
# Usage: STRATUS_GUEST_AGENT=BINARY STRATUS_KERNEL_IMAGE_DIR=DIR guest/build-debian.sh OUTPUT_DIR
#   OUTPUT_DIR                e.g. /var/cache/stratus/images/debian
#   STRATUS_GUEST_AGENT       the static stratus-guest-agent binary
#   STRATUS_KERNEL_IMAGE_DIR  a built default image (guest/build-image.sh output): its
#                             vmlinux and cmdline are used as they are
#   STRATUS_DEBIAN_MIRROR     the Debian archive (default http://deb.debian.org/debian)
#   STRATUS_BUILD_DIR         build cache (default /var/cache/stratus/build); this recipe
#                             uses its debian/ subdirectory
#
# Why /sbin/init is guest/init under busybox: the guest kernel is the default image's
# minimal microVM kernel, without what systemd needs (cgroups, namespaces, autofs, ...), so
# the image boots the same init script as the default image. That script is written for
# busybox: it calls applets by name (cttyhack, setsid, poweroff, mount, ip, dd, sleep), and
# Debian has no cttyhack and, without an init system, no poweroff at all. It is installed
# with its first line replaced by `#!/bin/busybox sh`: busybox-static's ash is built with
# FEATURE_SH_STANDALONE and FEATURE_PREFER_APPLETS, so it runs its own applets by name in
# preference to $PATH (what the default image's initramfs, which has no applet links, relies
# on). So init and its children (the agent's restart loop, the power-button watcher) behave
# as in the default image, and `sh -l` on the console is busybox's ash too (reading Debian's
# /etc/profile; root's shell in /etc/passwd stays /bin/bash, for su and the like). Debian's
# programs run wherever something is run by $PATH outside busybox's shell: the guest agent's
# `ip` is iproute2's /usr/sbin/ip, and exec requests run Debian's programs (/bin/sh = dash).
# init does not run `busybox --install`: /bin/ls exists, so Debian's tree is left as it is.
# On PVM hosts a dynamically linked Debian program costs the guest seconds of emulated page
# faults where a busybox applet costs about one: the boot path stays on busybox.
#
# Caching: OUTPUT_DIR/manifest records a sha256 over every input (this script, guest/init,
# the agent and kernel by content, the base command line, debootstrap's version, suite,
# mirror); when it matches, the script exits at once. The debootstrapped tree is kept
# pristine in $STRATUS_BUILD_DIR/debian/rootfs and reused while the bootstrap inputs
# (debootstrap version, suite, variant, packages, mirror, arch) are unchanged, so changing
# only the agent, init or this script's image steps copies it instead of downloading again.
# Delete that directory to pick up newer Debian packages (point releases, security fixes).
# Outputs are built in a temporary directory and renamed into place.
set -euo pipefail

usage() { echo "usage: $0 OUTPUT_DIR" >&2; exit 2; }
[ $# -eq 1 ] && [ -n "$1" ] || usage

OUT=$(realpath -m -- "$1")
GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$GUEST_DIR/$(basename "${BASH_SOURCE[0]}")"
INIT="$GUEST_DIR/init"
BUILD_DIR=${STRATUS_BUILD_DIR:-/var/cache/stratus/build}
DEB_DIR="$BUILD_DIR/debian"
PRISTINE="$DEB_DIR/rootfs"              # debootstrap's tree, never modified after it is made
PRISTINE_KEY="$DEB_DIR/rootfs.key"      # bootstrap key of $PRISTINE (written last)

SUITE=bookworm
VARIANT=minbase
INCLUDE=busybox-static,iproute2,iputils-ping,ca-certificates,procps
ARCH=amd64
MIRROR=${STRATUS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
INIT_SHEBANG='#!/bin/busybox sh'
MIN_SIZE_MIB=512
ALIGN_MIB=64
STEPS=6
PKGS=(debootstrap e2fsprogs)

T0=$SECONDS
log()  { printf '%s\n' "$*"; }
step() { printf '[%s/%s] %s\n' "$1" "$STEPS" "$2"; }
die()  { printf 'build-debian: error: %s\n' "$*" >&2; exit 1; }

[ -n "${STRATUS_GUEST_AGENT:-}" ] ||
	die "STRATUS_GUEST_AGENT is not set: it must name the static stratus-guest-agent binary (run 'stratus image build debian', which builds it)"
[ -f "$STRATUS_GUEST_AGENT" ] || die "STRATUS_GUEST_AGENT=$STRATUS_GUEST_AGENT: no such file"
[ -n "${STRATUS_KERNEL_IMAGE_DIR:-}" ] ||
	die "STRATUS_KERNEL_IMAGE_DIR is not set: it must name a built default image directory (guest/build-image.sh OUTPUT_DIR), whose vmlinux and cmdline this image uses"
[ -d "$STRATUS_KERNEL_IMAGE_DIR" ] || die "STRATUS_KERNEL_IMAGE_DIR=$STRATUS_KERNEL_IMAGE_DIR: no such directory"
KIMG=$(realpath -- "$STRATUS_KERNEL_IMAGE_DIR")
[ -s "$KIMG/vmlinux" ] || die "STRATUS_KERNEL_IMAGE_DIR=$KIMG has no vmlinux (build the default image first)"
[ -s "$KIMG/cmdline" ] || die "STRATUS_KERNEL_IMAGE_DIR=$KIMG has no cmdline (build the default image first)"
[ -f "$INIT" ] || die "$INIT: no such file"
head -c 2 "$INIT" | grep -qx '#!' || die "$INIT does not start with a #! line"
AGENT=$(realpath -- "$STRATUS_GUEST_AGENT")
AGENT_SHA=$(sha256sum <"$AGENT" | cut -d' ' -f1)
KERNEL_SHA=$(sha256sum <"$KIMG/vmlinux" | cut -d' ' -f1)
IMAGE_CMDLINE=$(head -n 1 "$KIMG/cmdline")
[ -n "$IMAGE_CMDLINE" ] || die "$KIMG/cmdline: the first line is empty"

# One dpkg-query for every host package we record (the cache-hit path must stay fast).
load_pkg_versions() {
	PKG_VERSIONS=$(dpkg-query -W -f='${Package}=${Version}\n' "${PKGS[@]}" 2>/dev/null || true)
}
pkg_version() {
	local v
	v=$(sed -n "s/^$1=//p" <<<"$PKG_VERSIONS" | head -1)
	echo "${v:-none}"
}
load_pkg_versions

# What the debootstrapped tree depends on (not the image steps, the agent or init).
bootstrap_key() {
	{
		echo "debootstrap=$(pkg_version debootstrap)"
		echo "suite=$SUITE variant=$VARIANT arch=$ARCH"
		echo "include=$INCLUDE"
		echo "mirror=$MIRROR"
	} | sha256sum | cut -d' ' -f1
}

input_hash() {
	{
		bootstrap_key      # debootstrap version, suite, variant, packages, mirror, arch
		echo "e2fsprogs=$(pkg_version e2fsprogs)"
		echo "suite=$SUITE"
		sha256sum "$SELF" "$INIT"
		echo "stratus-guest-agent=$AGENT_SHA"   # by content: paths vary
		echo "vmlinux=$KERNEL_SHA"
		echo "cmdline=$IMAGE_CMDLINE"
	} | sha256sum | cut -d' ' -f1
}

# --- cache hit: must stay fast (no locks, no builds) -------------------------
HASH=$(input_hash)
if [ -f "$OUT/manifest" ] && grep -qx "input_hash=$HASH" "$OUT/manifest" &&
	[ -s "$OUT/vmlinux" ] && [ -s "$OUT/rootfs.ext4" ] && [ -s "$OUT/cmdline" ]; then
	echo "image up to date: $OUT"
	exit 0
fi

# --- 1. dependencies ------------------------------------------------------------
step 1 "checking build dependencies"
[ "$(id -u)" -eq 0 ] || die "need root (debootstrap, chroot and device nodes)"
missing=()
for p in "${PKGS[@]}"; do
	st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
	[ "$st" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "    installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
	load_pkg_versions
	HASH=$(input_hash)   # package versions are part of the hash
else
	log "    all present (debootstrap $(pkg_version debootstrap), e2fsprogs $(pkg_version e2fsprogs))"
fi
for t in debootstrap mkfs.ext4 flock chroot sha256sum du find; do
	command -v "$t" >/dev/null || die "required tool '$t' not found"
done

mkdir -p "$DEB_DIR" "$(dirname "$OUT")"
exec 9>"$DEB_DIR/.lock"
if ! flock -n 9; then
	log "    waiting for another build-debian.sh (lock $DEB_DIR/.lock)"
	flock 9
	if [ -f "$OUT/manifest" ] && grep -qx "input_hash=$HASH" "$OUT/manifest"; then
		echo "image up to date: $OUT (built by the other run)"
		exit 0
	fi
fi

# Anything mounted below $1 (debootstrap mounts /proc and /sys in its target) is unmounted
# before the tree is removed: rm -rf must never walk into the host's /proc or /sys.
unmount_under() {
	local dir mnts m
	dir=$(realpath -m -- "$1")
	mnts=$(awk -v d="$dir/" 'index($2 "/", d) == 1 { print $2 }' /proc/mounts | sort -r)
	for m in $mnts; do umount -l "$m" 2>/dev/null || true; done
	! awk -v d="$dir/" 'index($2 "/", d) == 1 { found = 1 } END { exit !found }' /proc/mounts
}
remove_tree() {
	[ -e "$1" ] || return 0
	if unmount_under "$1"; then
		rm -rf "$1"
	else
		printf 'build-debian: warning: %s still has mounts; not removing it\n' "$1" >&2
	fi
}

# Temporary output dir on the same filesystem as $OUT, removed on any exit.
TMP=$(mktemp -d "$(dirname "$OUT")/.$(basename "$OUT").tmp.XXXXXX")
BOOT_TMP=
cleanup() {
	remove_tree "$TMP"
	if [ -n "$BOOT_TMP" ]; then remove_tree "$BOOT_TMP"; fi
}
trap cleanup EXIT

# --- 2. debootstrap (cached) --------------------------------------------------------
# debootstrap prints one I: line per package and phase: the phases are shown, the package
# lines (download, check, extract, unpack, configure) counted. Its full output is kept in
# $DEB_DIR/debootstrap.log.
run_debootstrap() {
	local target=$1 start=$SECONDS n=0 line dlog="$DEB_DIR/debootstrap.log"
	log "    log: $dlog"
	set +e
	debootstrap --arch="$ARCH" --variant="$VARIANT" --include="$INCLUDE" \
		"$SUITE" "$target" "$MIRROR" 2>&1 | tee "$dlog" | {
		while IFS= read -r line; do
			line=${line%"${line##*[![:space:]]}"}
			if [[ $line =~ ^I:\ (Retrieving|Validating)\ [^\ ]+\ [^\ ]+$ ||
				$line =~ ^I:\ (Extracting|Unpacking|Configuring)\ [^\ ]+\.\.\.$ ]]; then
				n=$((n + 1))
				[ $((n % 50)) -eq 0 ] && printf '    [%4ds] %4d package steps  %s\n' $((SECONDS - start)) "$n" "${line#I: }"
				continue
			fi
			case "$line" in
			I:*) printf '    [%4ds] %s\n' $((SECONDS - start)) "${line#I: }" ;;
			W:* | E:*) printf '    [%4ds] %s\n' $((SECONDS - start)) "$line" ;;
			esac
		done
	}
	local rc=("${PIPESTATUS[@]}")
	set -e
	if [ "${rc[0]}" != 0 ]; then
		echo "---- last lines of $dlog ----" >&2
		tail -15 "$dlog" >&2
		if [ -f "$target/debootstrap/debootstrap.log" ]; then
			echo "---- last lines of $target/debootstrap/debootstrap.log ----" >&2
			tail -15 "$target/debootstrap/debootstrap.log" >&2
		fi
		die "debootstrap $SUITE from $MIRROR failed (exit ${rc[0]})"
	fi
	log "    debootstrap finished in $((SECONDS - start))s"
}

BKEY=$(bootstrap_key)
if [ -f "$PRISTINE_KEY" ] && [ "$(cat "$PRISTINE_KEY")" = "$BKEY" ] && [ -x "$PRISTINE/bin/busybox" ]; then
	step 2 "debootstrap $SUITE: cached ($PRISTINE, made $(date -u -r "$PRISTINE_KEY" +%Y-%m-%dT%H:%M:%SZ))"
else
	step 2 "debootstrap --variant=$VARIANT $SUITE from $MIRROR (downloads ~50 MB; about a minute)"
	rm -f "$PRISTINE_KEY"
	BOOT_TMP=$(mktemp -d "$DEB_DIR/.rootfs.tmp.XXXXXX")
	chmod 0755 "$BOOT_TMP"   # the root directory's mode (mktemp makes it 0700)
	run_debootstrap "$BOOT_TMP"
	unmount_under "$BOOT_TMP" || die "debootstrap left mounts under $BOOT_TMP"
	[ -x "$BOOT_TMP/bin/busybox" ] || die "debootstrap finished but $BOOT_TMP/bin/busybox is missing"
	remove_tree "$PRISTINE"
	[ ! -e "$PRISTINE" ] || die "cannot remove the old $PRISTINE"
	mv -T "$BOOT_TMP" "$PRISTINE"
	BOOT_TMP=
	echo "$BKEY" >"$PRISTINE_KEY"
fi
grep -q '^VERSION_ID="12"' "$PRISTINE/etc/os-release" ||
	die "$PRISTINE/etc/os-release is not Debian 12: $(grep '^PRETTY_NAME=' "$PRISTINE/etc/os-release" || echo 'no PRETTY_NAME')"

# --- 3. image tree --------------------------------------------------------------------
step 3 "configuring the root filesystem (Debian $(cat "$PRISTINE/etc/debian_version"), guest agent, init)"
RFS="$TMP/rootfs.root"
cp -a "$PRISTINE" "$RFS"    # hard links, xattrs (ping's capability) and device nodes kept
# Package caches and indexes: apt-get update restores the lists when needed.
rm -rf "$RFS"/var/cache/apt/archives/*.deb "$RFS"/var/cache/apt/archives/partial/* \
	"$RFS"/var/cache/apt/*.bin "$RFS"/var/lib/apt/lists/* "$RFS"/var/cache/debconf/*-old \
	"$RFS"/var/lib/dpkg/*-old "$RFS"/debootstrap
mkdir -p "$RFS/var/lib/apt/lists/partial" "$RFS/var/cache/apt/archives/partial"
# debootstrap copies the build host's resolv.conf and hostname: the guest has neither DNS
# nor the host's name.
rm -f "$RFS/etc/resolv.conf" "$RFS/etc/hostname" "$RFS/etc/hosts" "$RFS/etc/fstab"
printf 'stratus\n' >"$RFS/etc/hostname"
cat >"$RFS/etc/hosts" <<-'EOF'
	127.0.0.1	localhost
	127.0.1.1	stratus
	::1		localhost ip6-localhost ip6-loopback
EOF
# Mounted by init with one `mount -a` (the same three lines as the default image).
cat >"$RFS/etc/fstab" <<-'EOF'
	sysfs   /sys      sysfs   defaults                          0 0
	tmpfs   /tmp      tmpfs   mode=1777,nosuid,nodev            0 0
	devpts  /dev/pts  devpts  gid=5,mode=620,ptmxmode=666       0 0
EOF
# Root without a password, as in the default image (the console is the way in).
grep -q '^root:' "$RFS/etc/shadow" || die "$RFS/etc/shadow has no root entry"
sed -i -E 's/^root:[^:]*:/root::/' "$RFS/etc/shadow"
# Debian's /etc/profile sets PS1 to '# ' and then reads /etc/profile.d: keep the default
# image's prompt (tests and people wait for "stratus# ").
printf "PS1='stratus# '\n" >"$RFS/etc/profile.d/stratus.sh"
# /sbin is a link to usr/sbin (merged /usr): write through the tree's own paths.
rm -f "$RFS/usr/sbin/init" "$RFS/usr/sbin/stratus-guest-agent"
{ echo "$INIT_SHEBANG"; tail -n +2 "$INIT"; } >"$RFS/usr/sbin/init"
chmod 0755 "$RFS/usr/sbin/init"
install -m 0755 "$AGENT" "$RFS/usr/sbin/stratus-guest-agent"
mkdir -p "$RFS/var/log"
[ -e "$RFS/dev/console" ] || mknod -m 0600 "$RFS/dev/console" c 5 1
[ -e "$RFS/dev/null" ] || mknod -m 0666 "$RFS/dev/null" c 1 3

# --- 4. checks: init runs under busybox in this tree ---------------------------------
step 4 "checking /sbin/init under the tree's busybox"
[ "$(head -n 1 "$RFS/sbin/init")" = "$INIT_SHEBANG" ] || die "/sbin/init does not start with $INIT_SHEBANG"
cmp -s <(tail -n +2 "$RFS/sbin/init") <(tail -n +2 "$INIT") || die "/sbin/init differs from guest/init beyond its first line"
[ -x "$RFS/bin/busybox" ] || die "the tree has no /bin/busybox (busybox-static)"
file_magic=$(od -An -c -N4 "$RFS/bin/busybox" | tr -d ' ')
[ "$file_magic" = '177ELF' ] || die "/bin/busybox is not an ELF binary"
# How init's shell resolves every external command init runs: an applet ("NAME is NAME")
# or a file in the tree; `type` only looks (no /proc needed in the chroot).
resolved=$(chroot "$RFS" /bin/busybox sh -c '
	export PATH=/sbin:/bin:/usr/sbin:/usr/bin
	for c in busybox mount ip poweroff reboot cttyhack setsid sh mkdir sleep dd sync; do type "$c"; done' 2>&1) ||
	die "busybox in the tree cannot resolve init's commands: $resolved"
while IFS= read -r line; do
	case "$line" in
	*"not found"*) die "init's command not available in the tree: $line" ;;
	esac
	log "    $line"
done <<<"$resolved"
for c in cttyhack poweroff; do
	grep -qx "$c is $c" <<<"$resolved" || die "busybox does not run '$c' as an applet (needs FEATURE_SH_STANDALONE): $resolved"
done
[ -x "$RFS/usr/sbin/ip" ] || die "iproute2's /usr/sbin/ip is missing (the guest agent runs 'ip' by \$PATH)"
grep -q '^PRETTY_NAME="Debian GNU/Linux 12' "$RFS/etc/os-release" || die "/etc/os-release does not name Debian 12"

# --- 5. rootfs.ext4 -------------------------------------------------------------------
CONTENT=$(du -sx -B1 "$RFS" | cut -f1)
NFILES=$(find "$RFS" -xdev | wc -l)
ALIGN=$((ALIGN_MIB << 20))
SIZE=$(((CONTENT * 13 / 10 + ALIGN - 1) / ALIGN * ALIGN))
[ "$SIZE" -ge $((MIN_SIZE_MIB << 20)) ] || SIZE=$((MIN_SIZE_MIB << 20))
# One inode per 16 KiB (mke2fs's default ratio), or 30% more inodes than files if more.
INODES=$((SIZE / 16384))
[ $((NFILES * 13 / 10)) -le "$INODES" ] || INODES=$((NFILES * 13 / 10))
step 5 "building rootfs.ext4 (mkfs.ext4 -d: $((CONTENT >> 20)) MiB in $NFILES files, $((SIZE >> 20)) MiB sparse)"
truncate -s "$SIZE" "$TMP/rootfs.ext4"   # sparse
# Deterministic filesystem ids derived from the input hash.
UUID=$(echo "$HASH" | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
mkfs.ext4 -q -F -T default -b 4096 -N "$INODES" -L stratus-root -U "$UUID" \
	-E "root_owner=0:0,hash_seed=$UUID" -d "$RFS" "$TMP/rootfs.ext4" ||
	die "mkfs.ext4 failed"
DEBIAN_VERSION=$(cat "$RFS/etc/debian_version")
OS_PRETTY=$(sed -n 's/^PRETTY_NAME=//p' "$RFS/etc/os-release" | tr -d '"')
NPKGS=$(dpkg-query --admindir="$RFS/var/lib/dpkg" -W -f='${db:Status-Status}\n' | grep -cx installed || true)
PKG_LIST=$(dpkg-query --admindir="$RFS/var/lib/dpkg" -W -f='${db:Status-Status} ${Package}=${Version}\n' \
	busybox-static iproute2 iputils-ping ca-certificates procps libc6 2>/dev/null | sed -n 's/^installed //p' || true)
remove_tree "$RFS"
cp "$KIMG/vmlinux" "$TMP/vmlinux"
log "    rootfs.ext4: $SIZE bytes apparent, $(($(stat -c %b "$TMP/rootfs.ext4") * $(stat -c %B "$TMP/rootfs.ext4"))) bytes allocated"

# --- 6. manifest + atomic install -------------------------------------------------
step 6 "writing manifest and installing into $OUT"
{
	echo "# Stratus Debian guest image, built by guest/build-debian.sh"
	echo "input_hash=$HASH"
	echo "bootstrap_key=$BKEY"
	echo "bootstrapped_at=$(date -u -r "$PRISTINE_KEY" +%Y-%m-%dT%H:%M:%SZ)"
	echo "suite=$SUITE"
	echo "variant=$VARIANT"
	echo "include=$INCLUDE"
	echo "mirror=$MIRROR"
	echo "os=$OS_PRETTY"
	echo "debian_version=$DEBIAN_VERSION"
	echo "packages_installed=$NPKGS"
	while IFS='=' read -r p v; do
		[ -n "$p" ] && echo "package.$p=$v"
	done <<<"$PKG_LIST"
	echo "host.debootstrap=$(pkg_version debootstrap)"
	echo "host.e2fsprogs=$(pkg_version e2fsprogs)"
	echo "kernel_image_dir=$KIMG"
	sed -n 's/^\(kernel_release\|input_hash\)=/kernel_image.\1=/p' "$KIMG/manifest" 2>/dev/null || true
	echo "rootfs_bytes=$SIZE"
	for f in vmlinux rootfs.ext4; do
		echo "sha256.$f=$(sha256sum "$TMP/$f" | cut -d' ' -f1)"
	done
	echo "sha256.stratus-guest-agent=$AGENT_SHA"
	echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$TMP/manifest"
# The command line the image boots with (`stratus vm run` reads it): the kernel's own.
echo "$IMAGE_CMDLINE" >"$TMP/cmdline"
chmod 0755 "$TMP"
sync -f "$TMP/manifest" 2>/dev/null || sync
# Swap directories: $OUT is always either the complete old image or the complete new one
# (at worst briefly absent, if we crash between the two renames).
OLD=
if [ -e "$OUT" ]; then
	OLD="$(dirname "$OUT")/.$(basename "$OUT").old.$$"
	mv -T "$OUT" "$OLD"
fi
mv -T "$TMP" "$OUT"
if [ -n "$OLD" ]; then rm -rf "$OLD"; fi
trap - EXIT
log "image ready: $OUT ($OS_PRETTY, $((SIZE >> 20)) MiB rootfs, $((SECONDS - T0))s)"
