#!/usr/bin/env bash
# Fetches the corpus of the perplexity and fidelity tasks: the King James
# Bible (1611, public domain), about 4.1 MB of English text, from the Debian
# packages bible-kjv (the `bible` program) and bible-kjv-text (its data). They
# are installed with apt-get when missing (as root, or through sudo). The text
# is printed one verse per line, the verse references are stripped, and each
# chapter becomes one paragraph. Nothing fetched here is committed.
#
# Idempotent: a corpus already present at full size is left alone. The file
# is written beside its destination and renamed into place only when complete.
#
# Destination: ${INFERLAB_CORPUS_DIR:-$HOME/.cache/inferlab/corpora}/kjv.txt
# (the path the `kjv` corpus name resolves to; see datasets/README.md).
set -euo pipefail

readonly packages=(bible-kjv bible-kjv-text)
readonly verse_count=31102     # verses of the King James Bible, Genesis 1:1 to Revelation 22:21
readonly min_bytes=4000000     # the text is about 4.1 MB; anything less is a partial write

corpus_dir="${INFERLAB_CORPUS_DIR:-$HOME/.cache/inferlab/corpora}"
corpus_path="$corpus_dir/kjv.txt"

die() { echo "fetch-corpus: error: $*" >&2; exit 1; }
log() { echo "fetch-corpus: $*"; }

file_size() { wc -c <"$1" | tr -d ' '; }

if [[ -f "$corpus_path" ]] && (( $(file_size "$corpus_path") >= min_bytes )); then
    log "$corpus_path already present ($(file_size "$corpus_path") bytes)"
    exit 0
fi

is_installed() {
    local status
    status="$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" || return 1
    [[ "$status" == "installed" ]]
}

install_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
        die "the 'bible' program is missing and this is not a Debian/Ubuntu system; get the King James" \
            "Bible as plain text some other way and give its path as the task's 'path' parameter"
    fi
    local missing=() package
    for package in "${packages[@]}"; do
        is_installed "$package" || missing+=("$package")
    done
    ((${#missing[@]} > 0)) || return 0
    local as_root=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 ||
            die "installing ${missing[*]} needs root and sudo is not available; ask an administrator to run:" \
                "apt-get install -y --no-install-recommends ${missing[*]}"
        as_root=(sudo)
    fi
    log "installing ${missing[*]}"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

command -v bible >/dev/null 2>&1 || install_packages
command -v bible >/dev/null 2>&1 || die "'bible' is still not on PATH after installing ${packages[*]}"

mkdir -p "$corpus_dir" || die "cannot create corpus directory $corpus_dir"
# Written beside the destination so the final rename is atomic (same file system).
partial="$(mktemp "$corpus_dir/.kjv.txt.partial.XXXXXX")"
trap 'rm -f "$partial"' EXIT

# `bible -f` prints one verse per line as "<book><chapter>:<verse> <text>",
# e.g. "1Sm3:10 And the LORD came, ...". The awk program drops the reference,
# joins the verses of a chapter into one paragraph and separates chapters by a
# blank line; it fails on any line of another shape, so a changed output
# format cannot slip through as a corrupt corpus.
log "extracting the text with 'bible' (about 4.1 MB)"
bible -f "gen1:1-rev22:21" </dev/null | awk -v expected="$verse_count" '
    $1 !~ /^[1-3]?[A-Za-z]+[0-9]+:[0-9]+$/ {
        printf "fetch-corpus: error: unexpected line %d from bible: %s\n", NR, substr($0, 1, 80) > "/dev/stderr"
        bad = 1
        exit 1
    }
    {
        chapter = $1
        sub(/:[0-9]+$/, "", chapter)
        text = substr($0, length($1) + 2)
        if (chapter != current) {
            if (NR > 1) printf "\n\n"
            current = chapter
            printf "%s", text
        } else {
            printf " %s", text
        }
    }
    END {
        if (bad) exit 1
        if (NR != expected) {
            printf "fetch-corpus: error: bible printed %d verses, expected %d\n", NR, expected > "/dev/stderr"
            exit 1
        }
        printf "\n"
    }' >"$partial" || die "could not extract the text from 'bible' (packages ${packages[*]})"

size="$(file_size "$partial")"
(( size >= min_bytes )) || die "the extracted text has $size bytes, expected at least $min_bytes"

chmod 0644 "$partial"
mv -f "$partial" "$corpus_path"
trap - EXIT
log "wrote $corpus_path ($size bytes, $verse_count verses)"
