#!/usr/bin/env bash
# Prepare this x86_64 Debian host to link aarch64 TVM libraries and run them under qemu-user.
#
# Idempotent, non-interactive, needs root (apt). Everything it builds lives under one directory:
#   pipeline.paths.aarch64_root(): $PIPELINE_AARCH64_ROOT, else ${PIPELINE_CACHE_DIR:-~/.cache/pipeline}/aarch64
#     sysroot/      Debian bookworm arm64 userland: python3.11 + the C/C++ libraries it and TVM need
#                   (arm64 .debs fetched by a private apt state, unpacked with `dpkg -x`; nothing is
#                   installed into the host's dpkg database and the host's apt architectures are untouched)
#     site/         aarch64 wheels of apache-tvm, apache-tvm-ffi, numpy (+ their deps), `pip --target`
#                   (runtime only: lib/libtvm_compiler.so is deleted, run with TVM_USE_RUNTIME_LIB=1;
#                   keep it with PIPELINE_AARCH64_FULL_TVM=1)
#     apt/          private arm64 apt state: package lists and the downloaded .debs
#     runtime.json  what pipeline/emulation.py reads: qemu binary, sysroot, python, site dir
# On the host it installs Debian's qemu-user-static (binfmt is NOT registered: qemu is invoked
# explicitly) and the pip package `ziglang` into the current Python (the aarch64 linker used by
# pipeline/toolchain/cross_link.py), then links one throw-away library so zig's libc stubs are built and
# cached once, in pipeline.paths.zig_cache_dir() (PIPELINE_ZIG_CACHE_DIR, else $PIPELINE_CACHE_DIR/zig), and builds
# the native runner for x86_64 and aarch64 (pipeline/toolchain/native_runner.py), which fills zig's libc++ there too.
#
# Env: PIPELINE_AARCH64_ROOT, PYTHON (host python; default `python`), DEBIAN_MIRROR,
#      DEBIAN_SECURITY_MIRROR, PIPELINE_AARCH64_FULL_TVM=1, PIPELINE_AARCH64_SKIP_LINKER=1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
# Where things live (pipeline/paths.py) and the versions (pyproject.toml) are each said once, and read from there.
ROOT="$(cd "$REPO" && "$PY" -c 'from pipeline import paths; print(paths.aarch64_root())')"
pin() {  # the requirement pyproject.toml gives a package, e.g. apache-tvm==0.27.0.post1
    "$PY" -c 'import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(next(d for d in deps if re.split(r"[<>=!~ ;\[]", d)[0] == sys.argv[2]))' "$REPO/pyproject.toml" "$1"
}
SUITE=bookworm  # fixed: its python3.11 matches the cp311 wheels, whatever the host's release
TVM_SPEC="$(pin apache-tvm)"
TVM_FFI_SPEC="$(pin apache-tvm-ffi)"
NUMPY_SPEC="numpy>=1.26,<3"
ZIG_SPEC="$(pin ziglang)"
# arm64 packages whose dependency closure forms the userland (apt resolves the closure).
ARM_PACKAGES=(python3.11-minimal libpython3.11-stdlib libstdc++6)
FULL_TVM="${PIPELINE_AARCH64_FULL_TVM:-0}"

if [[ $(id -u) -ne 0 ]]; then echo "setup_aarch64_runtime: must run as root (apt-get)" >&2; exit 1; fi
if [[ $(uname -m) != x86_64 ]]; then echo "setup_aarch64_runtime: written for an x86_64 host, this is $(uname -m)" >&2; exit 1; fi

mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"   # absolute: runtime.json records paths
exec 9>"$ROOT/.setup.lock"
flock 9   # two concurrent runs would race on the same directories

T_ALL=$EPOCHREALTIME
log() { printf '[setup-aarch64] %s\n' "$*"; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f s", b - a }'; }
stamp_ok() { [[ -f "$ROOT/.stamp-$1" && "$(cat "$ROOT/.stamp-$1")" == "$2" ]]; }
size_of() { du -sh "$1" 2>/dev/null | cut -f1; }

# ---------------------------------------------------------------- 1. qemu-user on the host
T=$EPOCHREALTIME
QEMU="$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)"
if [[ -z "$QEMU" ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: skips binfmt-support, so the kernel's binfmt table is left alone.
    apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null \
        || apt-get install -y -qq --no-install-recommends qemu-user >/dev/null
    QEMU="$(command -v qemu-aarch64-static || command -v qemu-aarch64)"
    log "installed $(dpkg-query -W -f='${Package} ${Version}' qemu-user-static 2>/dev/null || dpkg-query -W -f='${Package} ${Version}' qemu-user): $QEMU ($(elapsed "$T"))"
else
    log "qemu present: $QEMU"
fi
# llvm-objdump reads the aarch64 libraries' FMA loops (pipeline/toolchain/fma_loops.py, tests/test_fma_loops.py).
if ! compgen -c llvm-objdump >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends llvm >/dev/null
    log "installed llvm $(dpkg-query -W -f='${Version}' llvm): $(compgen -c llvm-objdump | head -1)"
else
    log "llvm-objdump present: $(compgen -c llvm-objdump | head -1)"
fi

# ---------------------------------------------------------------- 2. arm64 userland (sysroot)
SYSROOT="$ROOT/sysroot"
A="$ROOT/apt"
SYS_STAMP="$SUITE ${ARM_PACKAGES[*]}"
if stamp_ok sysroot "$SYS_STAMP" && [[ -x "$SYSROOT/usr/bin/python3.11" ]]; then
    log "arm64 userland present: $SYSROOT ($(size_of "$SYSROOT"))"
else
    T=$EPOCHREALTIME
    # Mirrors: those the host uses for Debian (keeps a proxy or snapshot setup), else deb.debian.org.
    host_uri() { grep -hoE "^URIs:.*|^deb +(\[[^]]*\] +)?[^ ]+" /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
                 | grep -oE "https?://[^ ]*/$1/?( |$)" | head -1 | tr -d ' ' || true; }
    MIRROR="${DEBIAN_MIRROR:-$(host_uri debian)}"; MIRROR="${MIRROR:-http://deb.debian.org/debian}"
    SEC_MIRROR="${DEBIAN_SECURITY_MIRROR:-$(host_uri debian-security)}"; SEC_MIRROR="${SEC_MIRROR:-http://deb.debian.org/debian-security}"
    KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -f $KEYRING ]] || { apt-get install -y -qq debian-archive-keyring >/dev/null; }
    rm -rf "$A/archives"; mkdir -p "$A/lists/partial" "$A/archives/partial" "$A/dpkg/updates" "$A/etc/sources.list.d" "$A/etc/preferences.d"
    : > "$A/dpkg/status"   # empty: apt resolves the whole dependency closure
    cat > "$A/etc/sources.list" <<EOF
deb [arch=arm64 signed-by=$KEYRING] $MIRROR $SUITE main
deb [arch=arm64 signed-by=$KEYRING] $MIRROR $SUITE-updates main
deb [arch=arm64 signed-by=$KEYRING] $SEC_MIRROR $SUITE-security main
EOF
    APT=(apt-get -q -o "APT::Architecture=arm64" -o "APT::Architectures::=arm64"
         -o "Dir::Etc::SourceList=$A/etc/sources.list" -o "Dir::Etc::SourceParts=$A/etc/sources.list.d"
         -o "Dir::Etc::PreferencesParts=$A/etc/preferences.d" -o "Dir::Etc::Preferences=$A/etc/preferences"
         -o "Dir::State=$A" -o "Dir::State::Lists=$A/lists" -o "Dir::State::status=$A/dpkg/status"
         -o "Dir::Cache=$A" -o "Dir::Cache::archives=$A/archives" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
         -o "APT::Install-Recommends=false" -o "APT::Install-Suggests=false" -o "Acquire::Languages=none"
         -o "APT::Sandbox::User=root")
    "${APT[@]}" update >/dev/null
    "${APT[@]}" install -y --download-only "${ARM_PACKAGES[@]}" >/dev/null
    T_DL=$(elapsed "$T")
    rm -rf "$SYSROOT.tmp"; mkdir -p "$SYSROOT.tmp"
    for deb in "$A"/archives/*.deb; do dpkg -x "$deb" "$SYSROOT.tmp"; done
    # dpkg -x runs no maintainer scripts; python3.11-minimal's symlinks are all that is missing.
    ln -sf python3.11 "$SYSROOT.tmp/usr/bin/python3"
    rm -rf "$SYSROOT.tmp"/usr/share/{doc,man,info,locale,lintian}
    rm -rf "$A/lists"   # 19 MB of package lists, fetched again only when the package set changes
    # Bytecode for the stdlib, written by the host CPython 3.11 (same magic number as bookworm's 3.11.2),
    # so the emulated interpreter never compiles it (and never needs to write into the sysroot).
    "$PY" -m compileall -q -j0 -x 'lib2to3|test/|idlelib|tkinter|turtledemo' "$SYSROOT.tmp/usr/lib/python3.11" >/dev/null || true
    rm -rf "$SYSROOT"; mv "$SYSROOT.tmp" "$SYSROOT"
    echo "$SYS_STAMP" > "$ROOT/.stamp-sysroot"
    NDEBS=$(ls "$A"/archives/*.deb | wc -l)
    log "arm64 userland: $NDEBS .debs ($(du -ch "$A"/archives/*.deb | tail -1 | cut -f1)) from $MIRROR $SUITE, download $T_DL, total $(elapsed "$T"): $SYSROOT ($(size_of "$SYSROOT"))"
    log "  .debs: $(cd "$A/archives" && ls *.deb | sed 's/_.*//' | tr '\n' ' ')"
fi

# ---------------------------------------------------------------- 3. aarch64 wheels (TVM runtime, numpy)
SITE="$ROOT/site"
SITE_STAMP="$TVM_SPEC $TVM_FFI_SPEC $NUMPY_SPEC full=$FULL_TVM"
if stamp_ok site "$SITE_STAMP" && [[ -d "$SITE/tvm" ]]; then
    log "aarch64 wheels present: $SITE ($(size_of "$SITE"))"
else
    T=$EPOCHREALTIME
    rm -rf "$SITE.tmp"
    "$PY" -m pip install -q --disable-pip-version-check --no-warn-script-location --target "$SITE.tmp" \
        --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
        --only-binary=:all: "$TVM_SPEC" "$TVM_FFI_SPEC" "$NUMPY_SPEC"
    FULL_SIZE=$(size_of "$SITE.tmp")
    if [[ "$FULL_TVM" != 1 ]]; then
        # Runtime only: pipeline/runtime.py needs tvm.runtime.vm, not the compiler (notes §3).
        rm -f "$SITE.tmp"/tvm/lib/libtvm_compiler.so
    fi
    rm -rf "$SITE"; mv "$SITE.tmp" "$SITE"
    echo "$SITE_STAMP" > "$ROOT/.stamp-site"
    log "aarch64 wheels: $(cd "$SITE" && ls -d *.dist-info | sed 's/\.dist-info//' | tr '\n' ' ')($FULL_SIZE, $(size_of "$SITE") after trimming) in $(elapsed "$T")"
fi

# ---------------------------------------------------------------- 4. what pipeline/emulation.py reads
RUNTIME_ONLY=true; [[ -f "$SITE/tvm/lib/libtvm_compiler.so" ]] && RUNTIME_ONLY=false
cat > "$ROOT/runtime.json.tmp" <<EOF
{
  "qemu": "$QEMU",
  "sysroot": "$SYSROOT",
  "python": "$SYSROOT/usr/bin/python3.11",
  "site": "$SITE",
  "runtime_only": $RUNTIME_ONLY,
  "suite": "$SUITE"
}
EOF
mv "$ROOT/runtime.json.tmp" "$ROOT/runtime.json"

# ---------------------------------------------------------------- 5. check: the emulated interpreter imports the runtime
T=$EPOCHREALTIME
ENV=(env -i PATH=/usr/bin:/bin HOME="$HOME" PYTHONPATH="$SITE" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
     OPENBLAS_NUM_THREADS=1 QEMU_LD_PREFIX="$SYSROOT")
[[ $RUNTIME_ONLY == true ]] && ENV+=(TVM_USE_RUNTIME_LIB=1)
"${ENV[@]}" "$QEMU" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -c \
    'import platform, sys, numpy, tvm; from tvm.runtime.vm import VirtualMachine; print(platform.machine(), sys.version.split()[0], "numpy", numpy.__version__, "tvm", tvm.__version__)' \
    | sed 's/^/[setup-aarch64] emulated: /'
log "emulated import check: $(elapsed "$T")"

# ---------------------------------------------------------------- 6. the aarch64 linker (pip ziglang), cache warmed
if [[ "${PIPELINE_AARCH64_SKIP_LINKER:-0}" != 1 ]]; then
    T=$EPOCHREALTIME
    if ! "$PY" -c 'import ziglang' 2>/dev/null; then
        "$PY" -m pip install -q --disable-pip-version-check "$ZIG_SPEC"
        log "pip installed $ZIG_SPEC into $PY ($(elapsed "$T"))"
    fi
    T=$EPOCHREALTIME
    (cd "$REPO" && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pipeline.toolchain.cross_link --warm-up) | sed 's/^/[setup-aarch64] /'
    log "linker warm-up: $(elapsed "$T")"
    # The native runner a bundle carries, for both CPUs: the first C++ build for a CPU builds zig's libc++ (minutes).
    T=$EPOCHREALTIME
    (cd "$REPO" && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c 'from pipeline.toolchain import native_runner as n
for arch in n.TRIPLES:
    for program in n.PROGRAMS:
        print(f"native {program} for {arch}: {n.build(program, arch)}")') | sed 's/^/[setup-aarch64] /'
    log "native runners: $(elapsed "$T")"
fi

log "done in $(elapsed "$T_ALL"): $ROOT ($(size_of "$ROOT"))"
