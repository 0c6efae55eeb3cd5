#!/usr/bin/env bash
# Regenerates DejaVuSans-ascii.ttf: DejaVu Sans (Debian's fonts-dejavu-core) cut down to
# printable ASCII plus the few symbols the plot's labels use (×, −, ·, …), with fontTools'
# subsetter. The result is committed; nothing runs this at build time.
#
#   apt-get install fonts-dejavu-core && pip install fonttools && ./make.sh
set -euo pipefail
cd "$(dirname "$0")"
src=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
python3 -m fontTools.subset "$src" \
  --unicodes="U+0020-007E,U+00B7,U+00D7,U+2026,U+2212" \
  --layout-features='' --no-hinting --desubroutinize \
  --name-IDs='*' --name-legacy --name-languages='*' \
  --output-file=DejaVuSans-ascii.ttf
ls -l DejaVuSans-ascii.ttf
