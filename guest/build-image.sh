#!/bin/bash
# Build the Stratus guest image from Debian packages only:
#   vmlinux            minimal microVM kernel (ELF, PVH entry note) from linux-source-6.1
#   initramfs.cpio     busybox-static userland, /init = guest/init (uncompressed: on PVM
#                      hosts inflating 1 MB of gzip costs the guest ~85 s of emulated code)
#   rootfs.ext4        64 MiB sparse ext4 with the same userland, /sbin/init = guest/init,
#                      and the guest agent as /usr/sbin/stratus-guest-agent
#   manifest           kernel release, package versions, input hash
#
# Usage: STRATUS_GUEST_AGENT=BINARY guest/build-image.sh OUTPUT_DIR
#   OUTPUT_DIR           e.g. /var/cache/stratus/images/default
#   STRATUS_GUEST_AGENT  the static stratus-guest-agent binary (`stratus image build` builds
#                        it and sets this)
#
# Caching: OUTPUT_DIR/manifest records a sha256 over every input; when it matches,
# the script exits at once. The kernel tree and objects live in $STRATUS_BUILD_DIR
# (default /var/cache/stratus/build) and the kernel is rebuilt only when its own
# inputs (config fragment, patches, linux-source/gcc versions, kernel build steps)
# change. Outputs are built in a temporary directory and renamed into place.
set -euo pipefail

usage() { echo "usage: $0 OUTPUT_DIR" >&2; exit 2; }
[ $# -eq 1 ] && [ -n "$1" ] || usage

OUT=$(realpath -m -- "$1")
GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$GUEST_DIR/$(basename "${BASH_SOURCE[0]}")"
FRAGMENT="$GUEST_DIR/kernel/config.fragment"
PATCH_DIR="$GUEST_DIR/kernel/patches"
INIT="$GUEST_DIR/init"
BUILD_DIR=${STRATUS_BUILD_DIR:-/var/cache/stratus/build}
JOBS=${STRATUS_JOBS:-$(nproc)}

KSRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
KSRC="$BUILD_DIR/linux-source-6.1"      # pristine Debian source + our patches
KOBJ="$BUILD_DIR/kernel-obj"            # out-of-tree objects (make O=)
KSTAMP="$KOBJ/.stratus-kernel-hash"     # kernel hash of the last successful build
KARCH=x86_64
BUSYBOX=/bin/busybox
ROOTFS_SIZE=64M
STEPS=6
PKGS=(linux-source-6.1 busybox-static cpio bc flex bison libelf-dev libssl-dev e2fsprogs patch)

IMAGE_CMDLINE="console=ttyS0 panic=1 noreplace-smp rodata=off percpu_alloc=page quiet"
T0=$SECONDS
log()  { printf '%s\n' "$*"; }
step() { printf '[%s/%s] %s\n' "$1" "$STEPS" "$2"; }
die()  { printf 'build-image: error: %s\n' "$*" >&2; exit 1; }

[ -n "${STRATUS_GUEST_AGENT:-}" ] ||
	die "STRATUS_GUEST_AGENT is not set: it must name the static stratus-guest-agent binary (run 'stratus image build', which builds it)"
[ -f "$STRATUS_GUEST_AGENT" ] || die "STRATUS_GUEST_AGENT=$STRATUS_GUEST_AGENT: no such file"
AGENT=$(realpath -- "$STRATUS_GUEST_AGENT")
AGENT_SHA=$(sha256sum <"$AGENT" | cut -d' ' -f1)

# One dpkg-query for every package we record (the cache-hit path must stay fast).
VERSIONED_PKGS=(linux-source-6.1 busybox-static e2fsprogs gcc-12 binutils)
load_pkg_versions() {
	PKG_VERSIONS=$(dpkg-query -W -f='${Package}=${Version}\n' "${VERSIONED_PKGS[@]}" 2>/dev/null || true)
}
pkg_version() {
	local v
	v=$(sed -n "s/^$1=//p" <<<"$PKG_VERSIONS" | head -1)
	echo "${v:-none}"
}
load_pkg_versions

patch_files() { compgen -G "$PATCH_DIR/*.patch" | LC_ALL=C sort || true; }

# Kernel recipe: the kernel hash covers the text of these functions, so editing
# how the kernel is built rebuilds it, while editing the rest of the script does not.
KERNEL_FUNCS=(kernel_hash extract_kernel_source prepare_kernel_source configure_kernel verify_kernel_config build_kernel kmake)

kmake() {
	make -C "$KSRC" O="$KOBJ" ARCH="$KARCH" \
		KBUILD_BUILD_USER=stratus KBUILD_BUILD_HOST=stratus "$@"
}

kernel_hash() {
	{
		echo "arch=$KARCH"
		echo "linux-source-6.1=$(pkg_version linux-source-6.1)"
		echo "gcc=$(gcc -dumpfullversion 2>/dev/null || echo none)"
		echo "binutils=$(pkg_version binutils)"
		declare -f "${KERNEL_FUNCS[@]}"
		sha256sum "$FRAGMENT"
		local p; for p in $(patch_files); do sha256sum "$p"; done
	} | sha256sum | cut -d' ' -f1
}

input_hash() {
	{
		kernel_hash
		echo "busybox-static=$(pkg_version busybox-static)"
		echo "e2fsprogs=$(pkg_version e2fsprogs)"
		sha256sum "$SELF" "$INIT"
		echo "stratus-guest-agent=$AGENT_SHA"   # by content: its path varies
	} | sha256sum | cut -d' ' -f1
}

# --- kernel ---------------------------------------------------------------------
# Source tree state: .stratus-source holds the package version it was extracted
# from; .stratus-patches/ holds copies of the patches applied on top, so a patch
# change is undone with `patch -R` (keeping untouched files' mtimes, hence an
# incremental build) and falls back to a fresh extraction if that fails.
extract_kernel_source() {
	local ver=$1 start=$SECONDS tmpsrc="$BUILD_DIR/.linux-source.tmp"
	log "    extracting $KSRC_TARBALL ($ver)"
	rm -rf "$KSRC" "$tmpsrc" "$KOBJ"
	mkdir -p "$tmpsrc"
	tar -xJf "$KSRC_TARBALL" -C "$tmpsrc" &
	local pid=$!
	while kill -0 "$pid" 2>/dev/null; do
		sleep 10
		kill -0 "$pid" 2>/dev/null && log "    ... extracting, $((SECONDS - start))s"
	done
	wait "$pid" || die "extracting $KSRC_TARBALL failed"
	[ -d "$tmpsrc/linux-source-6.1" ] || die "unexpected tarball layout in $KSRC_TARBALL"
	mv "$tmpsrc/linux-source-6.1" "$KSRC"
	rmdir "$tmpsrc"
	echo "$ver" >"$KSRC/.stratus-source"
	mkdir -p "$KSRC/.stratus-patches"
	log "    extracted in $((SECONDS - start))s"
}

prepare_kernel_source() {
	local ver p want have
	ver=$(pkg_version linux-source-6.1)
	if [ ! -f "$KSRC/.stratus-source" ] || [ "$(cat "$KSRC/.stratus-source")" != "$ver" ]; then
		extract_kernel_source "$ver"
	fi
	want=$(for p in $(patch_files); do sha256sum <"$p" | cut -d' ' -f1; done)
	have=$(for p in $(compgen -G "$KSRC/.stratus-patches/*.patch" | LC_ALL=C sort); do
		sha256sum <"$p" | cut -d' ' -f1; done)
	[ "$want" = "$have" ] && { log "    patches already applied"; return 0; }
	# Undo the old patch set (reverse order), or start over from the tarball.
	local applied=() ok=1
	mapfile -t applied < <(compgen -G "$KSRC/.stratus-patches/*.patch" | LC_ALL=C sort -r)
	for p in "${applied[@]}"; do
		if (cd "$KSRC" && patch -R -p1 -s --dry-run <"$p" >/dev/null 2>&1); then
			(cd "$KSRC" && patch -R -p1 -s <"$p") && rm -f "$p" && log "    reverted $(basename "$p")"
		else
			ok=0; break
		fi
	done
	if [ "$ok" = 0 ]; then
		log "    cannot revert old patches cleanly; re-extracting"
		extract_kernel_source "$ver"
	fi
	for p in $(patch_files); do
		log "    applying $(basename "$p")"
		(cd "$KSRC" && patch -p1 -s --no-backup-if-mismatch --forward <"$p") ||
			die "patch $(basename "$p") does not apply to linux-source-6.1 $ver"
		cp "$p" "$KSRC/.stratus-patches/"
	done
}

configure_kernel() {
	mkdir -p "$KOBJ"
	kmake -s tinyconfig >"$KOBJ/.stratus-config.log" 2>&1 ||
		{ tail -20 "$KOBJ/.stratus-config.log" >&2; die "make tinyconfig failed"; }
	"$KSRC/scripts/kconfig/merge_config.sh" -m -O "$KOBJ" "$KOBJ/.config" "$FRAGMENT" \
		>>"$KOBJ/.stratus-config.log" 2>&1 ||
		{ tail -20 "$KOBJ/.stratus-config.log" >&2; die "merge_config.sh failed"; }
	kmake -s olddefconfig >>"$KOBJ/.stratus-config.log" 2>&1 ||
		{ tail -20 "$KOBJ/.stratus-config.log" >&2; die "make olddefconfig failed"; }
	verify_kernel_config
}

# Every line of the fragment must survive tinyconfig + merge + olddefconfig:
# CONFIG_X=v must appear verbatim, "# CONFIG_X is not set" must not be enabled.
verify_kernel_config() {
	local line sym bad=0 actual
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*)
			grep -qxF -- "$line" "$KOBJ/.config" && continue
			sym=${line%%=*}
			actual=$(grep -E "^(# )?$sym[= ]" "$KOBJ/.config" || echo "(absent: dependency not met)")
			printf '    config: wanted %-40s got %s\n' "$line" "$actual" >&2
			bad=1 ;;
		"# CONFIG_"*" is not set")
			sym=${line#\# }; sym=${sym%% *}
			actual=$(grep -E "^$sym=" "$KOBJ/.config" || true)
			[ -z "$actual" ] && continue
			printf '    config: wanted %-40s got %s\n' "$sym=n" "$actual" >&2
			bad=1 ;;
		esac
	done <"$FRAGMENT"
	[ "$bad" = 0 ] || die "kernel config fragment did not survive merging (see above)"
	log "    all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$FRAGMENT") fragment options verified in .config"
}

build_kernel() {
	local start=$SECONDS n=0 line klog="$KOBJ/.stratus-build.log"
	log "    log: $klog"
	set +e
	kmake -j"$JOBS" vmlinux 2>&1 | tee "$klog" | {
		while IFS= read -r line; do
			case "$line" in
			"  "[A-Z]*)
				n=$((n + 1))
				[ $((n % 20)) -eq 0 ] &&
					printf '    [%4ds] %5d files  %s\n' $((SECONDS - start)) "$n" "${line#"${line%%[![:space:]]*}"}" ;;
			*warning:*) printf '    %s\n' "$line" ;;
			esac
		done
	}
	local rc=("${PIPESTATUS[@]}")
	set -e
	if [ "${rc[0]}" != 0 ]; then
		echo "---- last lines of $klog ----" >&2
		grep -E 'error|Error' "$klog" | tail -20 >&2 || true
		tail -15 "$klog" >&2
		die "kernel build failed (make exit ${rc[0]})"
	fi
	log "    kernel built in $((SECONDS - start))s"
}

# --- cache hit: must stay fast (no locks, no builds) -------------------------
HASH=$(input_hash)
if [ -f "$OUT/manifest" ] && grep -qx "input_hash=$HASH" "$OUT/manifest" &&
	[ -s "$OUT/vmlinux" ] && [ -s "$OUT/initramfs.cpio" ] && [ -s "$OUT/rootfs.ext4" ] && [ -s "$OUT/cmdline" ]; then
	echo "image up to date: $OUT"
	exit 0
fi

# --- 1. dependencies ------------------------------------------------------------
step 1 "checking build dependencies"
missing=()
for p in "${PKGS[@]}"; do
	st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
	[ "$st" = installed ] || missing+=("$p")
done
for t in gcc make patch sha256sum readelf gzip; do
	command -v "$t" >/dev/null || die "required tool '$t' not found (install gcc/make/patch/binutils)"
done
if [ ${#missing[@]} -gt 0 ]; then
	log "    installing: ${missing[*]}"
	[ "$(id -u)" -eq 0 ] || die "need root to install ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
	load_pkg_versions
	HASH=$(input_hash)   # package versions are part of the hash
else
	log "    all present (linux-source-6.1 $(pkg_version linux-source-6.1), busybox-static $(pkg_version busybox-static))"
fi

mkdir -p "$BUILD_DIR" "$(dirname "$OUT")"
exec 9>"$BUILD_DIR/.lock"
if ! flock -n 9; then
	log "    waiting for another build-image.sh (lock $BUILD_DIR/.lock)"
	flock 9
	if [ -f "$OUT/manifest" ] && grep -qx "input_hash=$HASH" "$OUT/manifest"; then
		echo "image up to date: $OUT (built by the other run)"
		exit 0
	fi
fi

# Temporary output dir on the same filesystem as $OUT, removed on any exit.
TMP=$(mktemp -d "$(dirname "$OUT")/.$(basename "$OUT").tmp.XXXXXX")
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

KHASH=$(kernel_hash)
if [ -f "$KSTAMP" ] && [ "$(cat "$KSTAMP")" = "$KHASH" ] && [ -s "$KOBJ/vmlinux" ] && [ -f "$KSRC/usr/gen_init_cpio.c" ]; then
	step 2 "configuring kernel: cached (kernel hash ${KHASH:0:12})"
	step 3 "building kernel: cached ($KOBJ/vmlinux)"
	KBUILD_SECS=$(cat "$KOBJ/.stratus-kernel-build-seconds" 2>/dev/null || echo unknown)
else
	step 2 "configuring kernel (tinyconfig + guest/kernel/config.fragment)"
	rm -f "$KSTAMP"
	prepare_kernel_source
	configure_kernel
	step 3 "building kernel (make -j$JOBS vmlinux; ~4-5 min from scratch on 2 cores)"
	kstart=$SECONDS
	build_kernel
	KBUILD_SECS=$((SECONDS - kstart))
	echo "$KBUILD_SECS" >"$KOBJ/.stratus-kernel-build-seconds"
	echo "$KHASH" >"$KSTAMP"
fi
KRELEASE=$(cat "$KOBJ/include/config/kernel.release")
# XEN_ELFNOTE_PHYS32_ENTRY is note type 18 (0x12); binutils 2.40 prints it as unknown.
readelf -n "$KOBJ/vmlinux" | grep -qE 'Xen[[:space:]]+0x[0-9a-f]+[[:space:]]+(XEN_ELFNOTE_PHYS32_ENTRY|.*\(0x00000012\))' ||
	die "vmlinux has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
cp "$KOBJ/vmlinux" "$TMP/vmlinux"
log "    vmlinux $KRELEASE: $(stat -c %s "$TMP/vmlinux") bytes, PVH entry note present"

# --- userland staging (shared by initramfs and rootfs) ------------------------
# Applet links from `busybox --list-full` (bin/, sbin/, usr/bin/, usr/sbin/).
stage_userland() {
	# $1: root directory; $2: "all" to link every applet (the rootfs), "minimal" for the
	# initramfs: busybox's shell runs applets by name without links (SH_STANDALONE), and on
	# PVM hosts every directory entry the kernel unpacks costs ~50 ms of emulated code.
	local root=$1 links=${2:-all} path
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,run,mnt,var/log}
	chmod 1777 "$root/tmp"
	chmod 0700 "$root/root"
	install -m 0755 "$BUSYBOX" "$root/bin/busybox"
	if [ "$links" = minimal ]; then
		ln -sfn busybox "$root/bin/sh"
	else
		while IFS= read -r path; do
			case "$path" in
			bin/busybox | linuxrc | "") continue ;;
			esac
			mkdir -p "$root/$(dirname "$path")"
			ln -sfn /bin/busybox "$root/$path"
		done < <("$BUSYBOX" --list-full)
	fi
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
	printf 'root:x:0:\ntty:x:5:\n' >"$root/etc/group"
	printf 'root::0:0:99999:7:::\n' >"$root/etc/shadow"
	chmod 0600 "$root/etc/shadow"
	printf 'stratus\n' >"$root/etc/hostname"
	# Mounted by init with one `mount -a` (one process instead of three).
	cat >"$root/etc/fstab" <<-'EOF'
		sysfs   /sys      sysfs   defaults                          0 0
		tmpfs   /tmp      tmpfs   mode=1777,nosuid,nodev            0 0
		devpts  /dev/pts  devpts  gid=5,mode=620,ptmxmode=666       0 0
	EOF
	cat >"$root/etc/profile" <<-'EOF'
		export PATH=/sbin:/bin:/usr/sbin:/usr/bin
		export PS1='stratus# '
	EOF
}

# --- 4. initramfs -----------------------------------------------------------------
step 4 "building initramfs (busybox-static $(pkg_version busybox-static), uncompressed cpio)"
GEN_CPIO="$BUILD_DIR/tools/gen_init_cpio"
if [ ! -x "$GEN_CPIO" ] || [ "$KSRC/usr/gen_init_cpio.c" -nt "$GEN_CPIO" ]; then
	mkdir -p "$BUILD_DIR/tools"
	gcc -O2 -o "$GEN_CPIO" "$KSRC/usr/gen_init_cpio.c"
fi
IRD="$TMP/initramfs.root"
SOURCE_DATE=$(stat -c %Y "$BUSYBOX")   # fixed timestamp for reproducible archives
stage_userland "$IRD" minimal
install -m 0755 "$INIT" "$IRD/init"
find "$IRD" -exec touch -h -d "@$SOURCE_DATE" {} +
# gen_init_cpio list: everything owned by root, device nodes without mknod,
# deterministic timestamps (-t), so identical inputs give an identical archive.
# Sorted paths put every directory before its contents.
{
	(cd "$IRD" && find . -mindepth 1 | LC_ALL=C sort) | while IFS= read -r f; do
		f=${f#./}
		if [ -L "$IRD/$f" ]; then
			echo "slink /$f $(readlink "$IRD/$f") 0777 0 0"
		elif [ -d "$IRD/$f" ]; then
			echo "dir /$f $(stat -c %a "$IRD/$f") 0 0"
		else
			echo "file /$f $IRD/$f $(stat -c %a "$IRD/$f") 0 0"
		fi
	done
	echo "nod /dev/console 0600 0 0 c 5 1"
	echo "nod /dev/null 0666 0 0 c 1 3"
} >"$TMP/initramfs.list"
"$GEN_CPIO" -t "$SOURCE_DATE" "$TMP/initramfs.list" >"$TMP/initramfs.cpio"
rm -rf "$IRD" "$TMP/initramfs.list"
log "    initramfs.cpio: $(stat -c %s "$TMP/initramfs.cpio") bytes"

# --- 5. rootfs ----------------------------------------------------------------------
step 5 "building rootfs (mkfs.ext4 -d, $ROOTFS_SIZE sparse)"
RFS="$TMP/rootfs.root"
stage_userland "$RFS"
rm -f "$RFS/sbin/init"
install -m 0755 "$INIT" "$RFS/sbin/init"
# The agent only in the rootfs: the initramfs is for quick boots, and its size costs boot time.
install -m 0755 "$AGENT" "$RFS/usr/sbin/stratus-guest-agent"
mknod -m 0600 "$RFS/dev/console" c 5 1 2>/dev/null || true
mknod -m 0666 "$RFS/dev/null" c 1 3 2>/dev/null || true
find "$RFS" -exec touch -h -d "@$SOURCE_DATE" {} +
truncate -s "$ROOTFS_SIZE" "$TMP/rootfs.ext4"   # sparse
# Deterministic filesystem ids derived from the input hash.
UUID=$(echo "$HASH" | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
# -T default: 4 KiB blocks (mke2fs would pick the 1 KiB "small" profile for 64 MiB).
E2FSPROGS_FAKE_TIME=$SOURCE_DATE mkfs.ext4 -q -F -T default -L stratus-root -U "$UUID" \
	-E "root_owner=0:0,hash_seed=$UUID" -d "$RFS" "$TMP/rootfs.ext4" ||
	die "mkfs.ext4 failed"
rm -rf "$RFS"
log "    rootfs.ext4: $(stat -c %s "$TMP/rootfs.ext4") bytes apparent, $(($(stat -c %b "$TMP/rootfs.ext4") * $(stat -c %B "$TMP/rootfs.ext4"))) bytes allocated"

# --- 6. manifest + atomic install -------------------------------------------------
step 6 "writing manifest and installing into $OUT"
{
	echo "# Stratus guest image, built by guest/build-image.sh"
	echo "input_hash=$HASH"
	echo "kernel_hash=$KHASH"
	echo "kernel_release=$KRELEASE"
	echo "kernel_build_seconds=$KBUILD_SECS"
	for p in "${VERSIONED_PKGS[@]}"; do
		echo "package.$p=$(pkg_version "$p")"
	done
	echo "patches=$(for p in $(patch_files); do basename "$p"; done | paste -sd, -)"
	for f in vmlinux initramfs.cpio rootfs.ext4; do
		echo "sha256.$f=$(sha256sum "$TMP/$f" | cut -d' ' -f1)"
	done
	echo "sha256.stratus-guest-agent=$AGENT_SHA"
	echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$TMP/manifest"
# The command line the image boots with (`stratus vm run` reads it). Each word after the
# console saves seconds of emulated boot on PVM hosts and costs nothing elsewhere.
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
log "image ready: $OUT (kernel $KRELEASE, $((SECONDS - T0))s)"
