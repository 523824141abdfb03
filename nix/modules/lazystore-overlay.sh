#!/usr/bin/env bash
# lazystore-overlay: steps 2-4 of docs/builders.md for the NixOS builder
# module (lazystore-overlay.service). /nix/store becomes an overlay whose
# lower layers are the machine's store (bound aside, read-only) and the
# lazystore mount on STATE/lazy, and Nix's database directory an overlay
# over the machine's; everything written goes to upper layers in STATE,
# which start empty and are emptied again on teardown, so the machine's
# store and database are as before.
#
# Unlike on a machine whose programs live outside /nix/store, on NixOS
# nearly every process started while the overlay is up runs from it (this
# script too), so it is rarely free to unmount: teardown then detaches it
# lazily (umount --lazy). New processes see the machine's own store at
# once; those started during the session keep what they opened until they
# exit, and the session's upper layers are moved to STATE/stale and
# deleted by the next setup.
#
#   lazystore-overlay setup STATE      (the mount must be up on STATE/lazy)
#   lazystore-overlay teardown STATE   (undoes whatever setup did; idempotent)
#
# Needs root, util-linux and coreutils. STATE is an absolute path without
# ',', ':' or spaces (the module checks it).
set -euo pipefail

STORE_DIR=/nix/store
DB_DIR=${NIX_STATE_DIR:-/nix/var/nix}/db

die() {
  echo "lazystore-overlay: $*" >&2
  exit 1
}

(($# == 2)) || die "usage: lazystore-overlay setup|teardown STATE"
cmd=$1
state=${2%/}
[[ $state == /* && $state != *[,:[:space:]]* ]] ||
  die "STATE must be an absolute path without ',', ':' or spaces, not $state"

# Whether the topmost mount at $1 is an overlay whose upper layer is $2.
overlay_on() {
  local top
  top=$(findmnt -n -r -o FSTYPE,OPTIONS --mountpoint "$1" 2>/dev/null | tail -n 1) || return 1
  [[ $top == overlay\ * && ($top == *"upperdir=$2,"* || $top == *"upperdir=$2") ]]
}

# Moves the directory $1 aside (a read-only bind on STATE/$2) and mounts an
# overlay on $1: lower layers the aside bind and then $4 if given, upper
# layer STATE/$3.
overlay_over() {
  local target=$1 aside=$state/$2 upper=$state/$3 work=$state/$3-work extra_lower=${4:-}
  mkdir -p "$aside" "$upper" "$work"
  mount --bind "$target" "$aside"
  # Private first, so that the overlay about to cover $target is not
  # propagated onto its own lower layer.
  mount --make-private "$aside"
  mount -o remount,bind,ro "$aside"
  # The overlay's root shows the upper directory's owner and mode: the
  # store's (root:nixbld 1775), or build users cannot create their outputs.
  chown --reference="$aside" "$upper"
  chmod --reference="$aside" "$upper"
  mount -t overlay lazystore \
    -o "lowerdir=$aside${extra_lower:+:$extra_lower},upperdir=$upper,workdir=$work" \
    "$target"
}

uppers=(store-upper store-upper-work db-upper db-upper-work)

# Deletes the upper layers of earlier sessions; never through a mount
# (--one-file-system).
forget_sessions() {
  local d
  for d in host-store host-db; do
    if mountpoint -q "$state/$d"; then
      die "$state/$d is still mounted; run: lazystore-overlay teardown $state"
    fi
  done
  rm -rf --one-file-system "${uppers[@]/#/$state/}" "$state/stale"
}

detached_lazily=
# Unmounts $1, or detaches it if it is busy.
unmount() {
  umount "$1" 2>/dev/null && return 0
  echo "lazystore-overlay: $1 is busy; detaching it (processes started while it was mounted keep what they opened until they exit)" >&2
  umount --lazy "$1" || die "cannot unmount $1"
  detached_lazily=1
}

setup() {
  mountpoint -q "$state/lazy" ||
    die "nothing is mounted on $state/lazy: lazystore-mount.service mounts the store there first"
  if overlay_on "$STORE_DIR" "$state/store-upper"; then
    die "$STORE_DIR is already an overlay over $state; run: lazystore-overlay teardown $state"
  fi
  forget_sessions
  overlay_over "$STORE_DIR" host-store store-upper "$state/lazy"
  overlay_over "$DB_DIR" host-db db-upper
  echo "lazystore-overlay: $STORE_DIR is an overlay over $state/lazy; $DB_DIR over the machine's database"
}

teardown() {
  if overlay_on "$DB_DIR" "$state/db-upper"; then unmount "$DB_DIR"; fi
  if mountpoint -q "$state/host-db"; then unmount "$state/host-db"; fi
  if overlay_on "$STORE_DIR" "$state/store-upper"; then unmount "$STORE_DIR"; fi
  if mountpoint -q "$state/host-store"; then unmount "$state/host-store"; fi
  if [[ -n $detached_lazily ]]; then
    # A detached overlay may still be using its upper layers: out of the
    # way, for the next setup to delete.
    local stale d
    stale=$state/stale/$(date +%s%N)
    mkdir -p "$stale"
    for d in "${uppers[@]}"; do
      if [[ -e $state/$d ]]; then mv "$state/$d" "$stale/"; fi
    done
  else
    forget_sessions
  fi
  echo "lazystore-overlay: $STORE_DIR and $DB_DIR are the machine's own again"
}

case $cmd in
  setup) setup ;;
  teardown) teardown ;;
  *) die "unknown command $cmd (setup or teardown)" ;;
esac
