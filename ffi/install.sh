#!/bin/sh
# Installs ferry's C library: libferry.so, libferry.a, ferry.h and a pkg-config file, ferry.pc.
#
#     cargo build --release -p ferry-ffi
#     sh ffi/install.sh [PREFIX]                 # PREFIX defaults to /usr/local
#     pkg-config --cflags --libs ferry
#
# PREFIX may also be set in the environment. LIBDIR (default PREFIX/lib) and INCLUDEDIR
# (default PREFIX/include) override where the files go; DESTDIR, for packagers, is put in
# front of every path written but not of the paths ferry.pc records. FERRY_BUILD_DIR is the
# folder holding the built libraries (default: target/release of this checkout, or of
# CARGO_TARGET_DIR). Nothing is built here.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
prefix=${1:-${PREFIX:-/usr/local}}
libdir=${LIBDIR:-$prefix/lib}
includedir=${INCLUDEDIR:-$prefix/include}
build=${FERRY_BUILD_DIR:-${CARGO_TARGET_DIR:-$root/target}/release}
destdir=${DESTDIR:-}

for lib in libferry.so libferry.a; do
  if [ ! -f "$build/$lib" ]; then
    echo "install.sh: $build/$lib is missing; build it first: cargo build --release -p ferry-ffi" >&2
    exit 1
  fi
done

# The workspace version: the first `version = "..."` of the root manifest ([workspace.package]).
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
if [ -z "$version" ]; then
  echo "install.sh: no version found in $root/Cargo.toml" >&2
  exit 1
fi

install -d "$destdir$libdir/pkgconfig" "$destdir$includedir"
install -m 0755 "$build/libferry.so" "$destdir$libdir/libferry.so"
install -m 0644 "$build/libferry.a" "$destdir$libdir/libferry.a"
install -m 0644 "$root/include/ferry.h" "$destdir$includedir/ferry.h"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@LIBDIR@|$libdir|g" -e "s|@INCLUDEDIR@|$includedir|g" \
  -e "s|@VERSION@|$version|g" "$here/ferry.pc.in" >"$destdir$libdir/pkgconfig/ferry.pc"
chmod 0644 "$destdir$libdir/pkgconfig/ferry.pc"

echo "installed ferry $version:"
echo "  $libdir/libferry.so, $libdir/libferry.a"
echo "  $includedir/ferry.h"
echo "  $libdir/pkgconfig/ferry.pc"
