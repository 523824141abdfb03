#!/usr/bin/env bash
# A build that reads part of its closure: files picked at random (a fixed
# seed) from every path of the builder bench's 1.6 GB closure until they
# hold 5 % of its NAR bytes, read whole in a shuffled order by one session
# through a builder's mount of `lazystore serve` with an empty local cache
# (loopback). What the builder fetched (chunk bytes, decoded, from the
# mount's counters) against the closure's NAR bytes (the target is at most
# 10 %) and against the bytes read. Directory windows, streams and
# readahead fetch ahead of the reader; this is what they cost a build that
# reads little.
#
# Usage: bench/partial.sh   (as root; release build; after bench/builder.sh
#                            made its corpus)
#   BENCH_DIR  the builder bench's directory (default
#              /var/tmp/lazystore-builder-bench)
#   SHARE      the share of the closure's NAR bytes to read (default 0.05)
set -euo pipefail
cd "$(dirname "$0")/.."
share=${SHARE:-0.05}
. bench/lib.sh
builder_corpus
t=$work/partial
mnt=$t/mnt
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  mountpoint -q "$mnt" && fusermount3 -u -z "$mnt" || true
  rm -rf "$t/cache.redb" "$t/cache.packs" "$t/cache.files"
}
trap cleanup EXIT
rm -rf "$t" && mkdir -p "$mnt"

# The files, from the binary cache's listings; the closure's NAR bytes.
python3 - "$work" "$share" >"$t/files" 2>"$t/picked" <<'EOF'
import json, random, sys
work, share = sys.argv[1], float(sys.argv[2])
files, nar = [], 0
for path in open(f"{work}/closure").read().split():
    base = path.rsplit("/", 1)[1]
    for line in open(f"{work}/cache/{base[:32]}.narinfo"):
        if line.startswith("NarSize:"):
            nar += int(line.split()[1])
    root = json.load(open(f"{work}/cache/{base[:32]}.ls"))["root"]
    def walk(entry, at):
        if entry.get("type") == "regular":
            files.append((at, entry.get("size", 0)))
        for name, child in sorted(entry.get("entries", {}).items()):
            walk(child, f"{at}/{name}")
    walk(root, path)
random.Random(5).shuffle(files)
picked, size = [], 0
for at, n in files:
    if size >= share * nar:
        break
    picked.append(at)
    size += n
print("\n".join(picked))
print(len(picked), size, nar, len(files), file=sys.stderr)
EOF
read -r n_files read_bytes nar_bytes all_files <"$t/picked"
sed "s|^/nix/store|$mnt|" "$t/files" >"$t/mounted"

started "$t/serve.out" serve --listen 127.0.0.1:0 --store "redb://$work/server/store.redb"
grpc=$(head -n 1 "$t/serve.out")
started "$t/mount.out" mount "$mnt" --store "$grpc" --cache "redb://$t/cache.redb"
mount_pid=$started_pid
drop_caches
t0=$(now)
xargs -a "$t/mounted" -d '\n' setsid --wait cat >/dev/null
t1=$(now)
fetched=$(awk '$1 == "chunk_bytes_fetched" { print $2 }' "$mnt/.lazystore/stats")
wire=$(awk '$1 == "remote_wire_bytes" { print $2 }' "$mnt/.lazystore/stats")
stopped "$mount_pid"

echo "a build reading $n_files of the closure's $all_files files, picked at random:"
printf '%-22s %14s %12s\n' '' bytes '/ closure'
row() { awk -v w="$1" -v b="$2" -v n="$nar_bytes" 'BEGIN { printf "%-22s %14d %11.2f%%\n", w, b, 100 * b / n }'; }
row 'closure (NAR)' "$nar_bytes"
row 'read by the build' "$read_bytes"
row 'fetched (chunks)' "$fetched"
row 'fetched (on the wire)' "$wire"
awk -v f="$fetched" -v r="$read_bytes" -v n="$nar_bytes" -v s="$(awk "BEGIN{print $t1-$t0}")" 'BEGIN {
  printf "fetched / read: %.2f×; %.2f s\n", f / r, s
  printf "target fetched ≤ 10%% of the closure: %s\n", (f <= 0.10 * n ? "met" : "not met") }'
