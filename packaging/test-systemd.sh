#!/usr/bin/env bash
# Tests the Debian package nats-fs-worker under a real systemd, without touching this machine.
#
#   packaging/test-systemd.sh        from any folder; as root; exit 0 when every check passed
#
# Not root: prints "SKIPPED: ... needs root" and exits 0.
#
# What it does:
#  1. installs debootstrap and systemd-container with apt-get when they are missing;
#  2. builds a minimal Debian root (debootstrap --variant=minbase, with systemd) once and keeps
#     it in the cargo target folder ($target/systemd-root/bookworm); later runs reuse it. Each
#     run boots it with `systemd-nspawn --volatile=overlay`: the cached root is the read-only
#     lower layer of an overlay whose upper layer is a tmpfs that disappears with the container,
#     so the cache stays pristine and nothing of a run survives it (without overlayfs: a
#     throwaway `cp -a` copy, removed at the end);
#  3. builds the package (packaging/build-deb.sh) and the example controller (examples/submit.rs);
#  4. starts a private nats-server on the host's loopback (the container shares the host's
#     network);
#  5. boots the container (systemd is pid 1 inside; driven with `nsenter -t <its pid> -a`);
#  6. installs the package in it, configures /etc/default/nats-fs-supervisor and a drop-in that
#     makes /srv/jobs writable;
#  7. checks through systemd: (a) start → active and ready, and `systemd-analyze security` no
#     worse than documented; (b) a job runs as a pool user with no_new_privs, no capability,
#     oom_score_adj 1000 (the supervisor below 0), the packaged process limit and no core
#     dumps, under OOMPolicy=continue and TasksMax=8192; (c) `systemctl stop` drains a running job and exits 0;
#     (d) kill -9 of the supervisor → restarted, the job redelivered and finished on attempt 2;
#     (e) a bad setting → failed with exit status 2, named in the journal, not restarted in a
#     loop; (f) an upgrade whose packaged settings file changed keeps the edited one and the
#     service runs; (g) purge removes the users, the group, the workspaces and the settings;
#     and, over the whole run, systemd had no warning about the unit (unit file, drop-in,
#     left-over processes);
#  8. always tears down (trap, also on failure and Ctrl-C): ends the container and the
#     nats-server it started (by pid, never by name), removes its temporary files;
#  9. prints how long each part took.
#
# TEST_SYSTEMD_COPY=1 boots a throwaway copy of the cached root instead of an overlay.
#
# Never boots systemd on this machine's own root (a systemd sharing the machine's /tmp empties it
# at boot): only inside the container root, with systemd-nspawn. Refuses to run while another run
# (or a container a killed run left behind) holds the lock $target/systemd-root/.lock.
# A failed check prints `systemctl status` and `journalctl -u nats-fs-supervisor` of the container.
#
# Commands for the container are in single quotes on purpose (`sh -c '... "$1"' sh ARG`,
# dpkg-query formats): they are expanded there, not here.
# shellcheck disable=SC2016
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

PKG=nats-fs-worker
UNIT=nats-fs-supervisor
ENV_FILE=/etc/default/nats-fs-supervisor
DROP_IN=/etc/systemd/system/$UNIT.service.d/jobs.conf
GROUP=nats-fs
POOL_USERS=(nats-fs-1 nats-fs-2 nats-fs-3 nats-fs-4)
JOBS=/srv/jobs
# Owner of the job folders: a controller's uid that is not in the pool (no passwd entry needed).
JOB_OWNER=1000
# The container's root: what debootstrap installs. Changing this list rebuilds the cache.
SUITE=bookworm
INCLUDE=systemd,systemd-sysv,dbus,adduser
# debootstrap writes no /etc/hosts (the installer does): add the usual one, so that `localhost`
# (the built-in NATS_URL) resolves as on a real host.
HOSTS=$'127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback'
RECIPE="debootstrap --variant=minbase --include=$INCLUDE $SUITE; /etc/hosts: $HOSTS"
# Settings of the service under test. The ack wait is short, so that a killed supervisor's job
# comes back quickly: 5 s costs nothing over 3 s here (the job cannot come back before the
# restart, RestartSec=5s) and leaves more room on a loaded machine (a job whose progress acks
# go unconfirmed for 9/10 of it is stopped). The drain timeout is long enough for the drain
# check's job and well below TimeoutStopSec=6min.
ACK_WAIT=5s
DRAIN_TIMEOUT=60s
# The drain check's job sleeps this long; the stop must take about what is left of it.
DRAIN_JOB_SECONDS=6

say() { printf 'test-systemd: %s\n' "$*" >&2; }
fail() {
    printf 'test-systemd: FAIL: %s\n' "$*" >&2
    exit 1
}

if [[ $(id -u) != 0 ]]; then
    say "SKIPPED: booting Debian with systemd in a container (debootstrap, systemd-nspawn) needs root"
    exit 0
fi
cd "$root"

# ---- timings ------------------------------------------------------------------------------
now_ms() {
    local t=${EPOCHREALTIME/[.,]/}
    printf '%s\n' $((10#$t / 1000))
}
fmt_ms() { printf '%d.%ds' $(($1 / 1000)) $(($1 % 1000 / 100)); }
started_ms=$(now_ms)
timings=()
phase_name=
phase_t0=0
# phase NAME: ends the current part (records its time) and starts the next one.
phase() {
    phase_done
    phase_name=$1
    phase_t0=$(now_ms)
    say "== $1"
}
phase_done() {
    if [[ -n $phase_name ]]; then
        timings+=("$phase_name|$(($(now_ms) - phase_t0))")
        phase_name=
    fi
}
print_timings() {
    local line
    say "timings:"
    for line in "${timings[@]}"; do
        printf 'test-systemd:   %-40s %7s\n' "${line%%|*}" "$(fmt_ms "${line##*|}")" >&2
    done
    printf 'test-systemd:   %-40s %7s\n' "total" "$(fmt_ms $(($(now_ms) - started_ms)))" >&2
}

# ---- the cache folder and the lock ---------------------------------------------------------
target=$(cargo metadata --no-deps --format-version 1 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[[ -n $target ]] || fail "could not find the cargo target folder (cargo metadata)"
cache_dir=$target/systemd-root
cached=$cache_dir/$SUITE
mkdir -p "$cache_dir"
# One run at a time. The container and the nats-server inherit the lock, so a container that a
# killed run left behind also keeps the next run from starting over it.
exec 9>"$cache_dir/.lock"
# The processes that have the lock file open: "pid command" lines.
lock_holders() {
    local fd pid
    for fd in /proc/[0-9]*/fd/*; do
        [[ $(readlink "$fd" 2>/dev/null) == "$cache_dir/.lock" ]] || continue
        pid=${fd#/proc/}
        pid=${pid%%/*}
        printf '  %s %s\n' "$pid" "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
    done | sort -un
}
if ! flock -n 9; then
    say "the lock $cache_dir/.lock is held by:"
    lock_holders 9>&- >&2 # (without this shell's own descriptor, nor its pipeline's)
    fail "another packaging/test-systemd.sh is running, or the container or nats-server of a killed run is still alive (above): refusing to run beside it"
fi

# ---- state the trap tears down --------------------------------------------------------------
work=$(mktemp -d /tmp/test-systemd.XXXXXX)
nspawn_pid=      # the systemd-nspawn process (our child)
machine=nats-fs-test-$$ # its machine name (and the container's host name)
cpid=            # the container's pid 1 (systemd), a child of nspawn_pid
nats_pid=        # the private nats-server (our child)
building=        # a debootstrap folder being built (removed if we stop half-way)
run_copy=        # the throwaway copy of the root (TEST_SYSTEMD_COPY mode only)
inflight=        # a command running inside the container (timeout's pid, see inside_t)
declare -A submit_pids=()

# Is this pid a live process (not a zombie)?
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# stop_pid PID WAIT GRACE: waits up to WAIT seconds for our child PID to exit, then sends SIGTERM
# and waits up to GRACE seconds, then SIGKILL; reaps it.
stop_pid() {
    local pid=$1 patience=$2 grace=$3 i
    [[ -n $pid ]] || return 0
    for ((i = 0; i < patience * 10; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 10; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
    fi
    if alive "$pid"; then
        say "cleanup: pid $pid did not stop within ${grace}s of SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# kill_container_init: SIGKILL to the container's pid 1 (a child of systemd-nspawn in a pid
# namespace of its own; checked again, so that a recycled pid is never hit).
kill_container_init() {
    local kid kids=()
    read -r -a kids < <(cat /proc/"$nspawn_pid"/task/*/children 2>/dev/null) || true
    for kid in "${kids[@]}"; do
        [[ $(readlink "/proc/$kid/ns/pid" 2>/dev/null) != "$(readlink /proc/self/ns/pid)" ]] || continue
        kill -KILL "$kid" 2>/dev/null || true
    done
}

# rm -rf that never crosses into another file system (a mount left inside a root).
remove_tree() {
    [[ -n $1 && -e $1 ]] || return 0
    rm -rf --one-file-system "$1" || say "cleanup: could not remove all of $1"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $phase_name ]]; then
        [[ $rc == 0 ]] || phase_name="$phase_name (failed)"
        phase_done
    fi
    phase_name=teardown
    phase_t0=$(now_ms)
    if [[ -n $inflight ]]; then
        kill -TERM "$inflight" 2>/dev/null # timeout passes it on to its process group
        wait "$inflight" 2>/dev/null
    fi
    local id
    for id in "${!submit_pids[@]}"; do
        kill -TERM "${submit_pids[$id]}" 2>/dev/null
        wait "${submit_pids[$id]}" 2>/dev/null
    done
    if [[ -n $nspawn_pid ]]; then
        # The container's pid 1 first: SIGKILL to the init of a pid namespace ends every process
        # in it at once (a clean poweroff would wait for the service's drain, up to its
        # TimeoutStopSec), and systemd-nspawn then exits by itself, removing what it made in
        # /run/systemd/nspawn. Killing systemd-nspawn instead would leave the container running:
        # its systemd outlives the death of its parent.
        kill_container_init
        stop_pid "$nspawn_pid" 5 2
        if [[ -n $cpid ]] && alive "$cpid" &&
            [[ $(readlink "/proc/$cpid/ns/pid" 2>/dev/null) != "$(readlink /proc/self/ns/pid)" ]]; then
            kill -KILL "$cpid" 2>/dev/null
        fi
        # Left only if systemd-nspawn itself had to be killed (the name is this run's).
        [[ -e /run/systemd/nspawn/propagate/$machine ]] && rm -rf "/run/systemd/nspawn/propagate/$machine"
    fi
    stop_pid "$nats_pid" 0 5
    remove_tree "$run_copy"
    remove_tree "$building"
    phase_done
    # The logs of a failed check stay for a look; not those of a success or an interruption.
    if [[ $rc == 1 ]]; then
        say "logs kept in $work"
    else
        rm -rf "$work"
    fi
    print_timings
    if [[ $rc != 0 ]]; then
        say "FAILED (exit $rc)"
    else
        say "passed"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Shows a log file and fails.
fail_with_log() {
    say "---- $2"
    tail -n 60 "$2" >&2
    say "----"
    fail "$1"
}

# ---- 1. tools -----------------------------------------------------------------------------
phase "tools"
export DEBIAN_FRONTEND=noninteractive
apt_install() {
    # A concurrent apt (another test installing something) holds the lock for a while: wait.
    apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 "$@" \
        </dev/null >>"$work/apt.log" 2>&1 ||
        { apt-get update -o DPkg::Lock::Timeout=300 </dev/null >>"$work/apt.log" 2>&1 &&
            apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 "$@" \
                </dev/null >>"$work/apt.log" 2>&1; } ||
        fail_with_log "apt-get install $* failed" "$work/apt.log"
}
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ! command -v systemd-nspawn >/dev/null; then
    # systemd-container must be the version of the installed systemd: asking for the newest
    # would upgrade this machine's systemd as well. Pin it when that version is available.
    sd_version=$(dpkg-query -W -f='${Version}' systemd 2>/dev/null || true)
    if [[ -n $sd_version ]] && apt-cache madison systemd-container 2>/dev/null |
        awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | grep -qxF "$sd_version"; then
        missing+=("systemd-container=$sd_version")
    else
        missing+=(systemd-container)
    fi
fi
command -v nats-server >/dev/null || missing+=(nats-server)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt_install "${missing[@]}"
fi
for tool in debootstrap systemd-nspawn nsenter nats-server dpkg-deb flock unshare timeout; do
    command -v "$tool" >/dev/null || fail "$tool is missing"
done

# ---- 2. the container root (cached) -------------------------------------------------------
# The Debian mirror apt on this machine uses for $SUITE (deb822 .sources first, then one-line
# .list files), else deb.debian.org.
debian_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        uri=$(awk -v suite="$SUITE" 'BEGIN { RS = "" }
            {
                u = ""; s = 0; t = 0; off = 0
                n = split($0, line, "\n")
                for (i = 1; i <= n; i++) {
                    if (line[i] ~ /^URIs:/) { split(line[i], w, /[ \t]+/); u = w[2] }
                    if (line[i] ~ /^Suites:/ && (line[i] " ") ~ ("[ \t]" suite "[ \t]")) s = 1
                    if (line[i] ~ /^Types:/ && (line[i] " ") ~ /[ \t]deb[ \t]/) t = 1
                    if (line[i] ~ /^Enabled:[ \t]*no/) off = 1
                }
                if (u != "" && s && t && !off) { print u; exit }
            }' "$f")
        [[ -n $uri ]] && { printf '%s\n' "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        uri=$(awk -v suite="$SUITE" '$1 == "deb" {
                i = 2
                if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f")
        [[ -n $uri ]] && { printf '%s\n' "$uri"; return; }
    done
    printf '%s\n' http://deb.debian.org/debian
}

# Folders of interrupted builds or copies (we hold the lock: nobody else uses them).
for leftover in "$cache_dir/$SUITE".tmp.* "$cache_dir"/run.*; do
    [[ -e $leftover ]] || continue
    say "removing $leftover, left by an interrupted run"
    remove_tree "$leftover"
done

if [[ -f $cached/.test-systemd-recipe && $(cat "$cached/.test-systemd-recipe") == "$RECIPE" ]]; then
    phase "root: cached"
    say "reusing $cached"
else
    mirror=$(debian_mirror)
    phase "root: debootstrap"
    say "debootstrap from $mirror into $cached (cached for later runs)"
    building=$(mktemp -d "$cached.tmp.XXXXXX")
    # In a mount namespace of its own: the /proc, /sys (and /dev) it mounts inside the new root
    # disappear with it, even if it is killed half-way.
    unshare --mount --propagation private \
        debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$building" "$mirror" \
        </dev/null >"$work/debootstrap.log" 2>&1 ||
        fail_with_log "debootstrap failed" "$work/debootstrap.log"
    chmod 0755 "$building" # mktemp made it 0700: the container's / must be 0755
    rm -f "$building"/var/cache/apt/archives/*.deb
    [[ -e $building/etc/hosts ]] || printf '%s\n' "$HOSTS" >"$building/etc/hosts"
    printf '%s\n' "$RECIPE" >"$building/.test-systemd-recipe"
    # Complete: swap it in (a stale root for another recipe goes).
    if [[ -e $cached ]]; then
        mv "$cached" "$cached.tmp.old$$"
        mv "$building" "$cached"
        remove_tree "$cached.tmp.old$$"
    else
        mv "$building" "$cached"
    fi
    building=
    say "cached the root in $cached ($(du -sh "$cached" | cut -f1))"
fi

# ---- 3. the package and the controller ----------------------------------------------------
phase "build: package (build-deb.sh)"
"$here/build-deb.sh" >"$work/build-deb.out" 2>"$work/build-deb.log" ||
    fail_with_log "packaging/build-deb.sh failed" "$work/build-deb.log"
deb=$(tail -n1 "$work/build-deb.out")
[[ -f $deb ]] || fail "build-deb.sh printed '$deb', which is not a file"
version=$(dpkg-deb -f "$deb" Version)

phase "build: examples/submit, upgrade package"
cargo build --locked --example submit >"$work/build-submit.log" 2>&1 ||
    fail_with_log "cargo build --example submit failed" "$work/build-submit.log"
submit=$target/debug/examples/submit
[[ -x $submit ]] || fail "$submit is missing after cargo build --example submit"

# The upgrade of check (f): the same package with a higher version and a packaged settings file
# that changed too, so that dpkg has a conffile question to answer (test-deb.sh covers the
# unchanged file). Built now, on the host, as test-deb.sh does.
next_version=$version+systemdtest1
dpkg-deb -R "$deb" "$work/next"
sed -i "s/^Version: .*/Version: $next_version/" "$work/next/DEBIAN/control"
packaged_marker="# packaged settings of $next_version (test-systemd.sh)"
printf '\n%s\n' "$packaged_marker" >>"$work/next$ENV_FILE"
if [[ -f $work/next/DEBIAN/md5sums ]]; then
    sum=$(cd "$work/next" && md5sum "${ENV_FILE#/}")
    sed -i "s#^[0-9a-f]*  ${ENV_FILE#/}\$#$sum#" "$work/next/DEBIAN/md5sums"
fi
# -Znone: xz would take 6 s here, for a package that is installed once and thrown away.
dpkg-deb --root-owner-group -Znone -b "$work/next" "$work/next.deb" >/dev/null ||
    fail "could not build the upgrade package"

# ---- 4. nats-server -----------------------------------------------------------------------
phase "nats-server"
mkdir -p "$work/nats/js" "$work/nats/ports"
# setsid: its own session, so that a Ctrl-C reaches only this script, which stops it in order.
setsid nats-server -a 127.0.0.1 -p -1 -js -sd "$work/nats/js" --ports_file_dir "$work/nats/ports" \
    </dev/null >"$work/nats/nats-server.log" 2>&1 &
nats_pid=$!
nats_url=
for ((i = 0; i < 200; i++)); do
    ports=$work/nats/ports/nats-server_$nats_pid.ports
    if [[ -s $ports ]]; then
        nats_url=$(sed -n 's/.*"nats":\["\([^"]*\)".*/\1/p' "$ports")
        [[ -n $nats_url ]] && break
    fi
    alive "$nats_pid" || fail_with_log "nats-server did not start" "$work/nats/nats-server.log"
    sleep 0.05
done
[[ -n $nats_url ]] || fail_with_log "nats-server did not report its port within 10 s" "$work/nats/nats-server.log"
say "nats-server at $nats_url (pid $nats_pid)"

# ---- 5. boot ------------------------------------------------------------------------------
phase "boot"
if [[ ${TEST_SYSTEMD_COPY:-} != 1 ]] && ! grep -qw overlay /proc/filesystems; then
    modprobe overlay 2>/dev/null || true
fi
if [[ ${TEST_SYSTEMD_COPY:-} != 1 ]] && grep -qw overlay /proc/filesystems; then
    root_dir=$cached
    volatile=(--volatile=overlay)
    boot_hint=" (if it cannot mount the overlay here, try TEST_SYSTEMD_COPY=1)"
    say "root: overlay (tmpfs) over $cached"
else
    boot_hint=
    run_copy=$cache_dir/run.$$
    cp -a --reflink=auto "$cached" "$run_copy"
    root_dir=$run_copy
    volatile=()
    say "root: a copy of $cached in $run_copy"
fi
# --register=no --keep-unit: no machined, no scope unit (this machine runs no systemd).
# --link-journal=no: the container's journal stays inside it. No --private-network: the units
# inside reach the nats-server on the host's loopback.
setsid systemd-nspawn -D "$root_dir" "${volatile[@]}" -M "$machine" --register=no --keep-unit \
    --console=passive --link-journal=no -b </dev/null >"$work/nspawn.log" 2>&1 &
nspawn_pid=$!

# The container's pid 1 is the child of systemd-nspawn that runs in another pid namespace and
# has become systemd. (Before that, a child is still systemd-nspawn's own code, in this
# machine's mount namespace: nothing may be run "inside" it yet.)
my_pidns=$(readlink /proc/self/ns/pid)
find_init() {
    local kid kids=()
    read -r -a kids < <(cat /proc/"$nspawn_pid"/task/*/children 2>/dev/null) || true
    for kid in "${kids[@]}"; do
        [[ $(readlink "/proc/$kid/ns/pid" 2>/dev/null) != "$my_pidns" ]] || continue
        [[ $(cat "/proc/$kid/comm" 2>/dev/null) == systemd ]] || continue
        cpid=$kid
        return 0
    done
    return 1
}
deadline=$((SECONDS + 30))
until find_init; do
    alive "$nspawn_pid" || fail_with_log "systemd-nspawn exited during the boot$boot_hint" "$work/nspawn.log"
    ((SECONDS < deadline)) || fail_with_log "no systemd in the container after 30 s" "$work/nspawn.log"
    sleep 0.05
done

# inside_t SECONDS COMMAND...: runs COMMAND inside the container (all its namespaces, a clean
# environment); gives up after SECONDS (exit status 124: timeout kills its whole process group,
# the part of nsenter that runs inside the container too). Started in the background and waited
# for: a Ctrl-C or SIGTERM then runs the trap at once, whatever the command makes of the signal
# (a foreground command that exits normally on SIGINT makes bash skip the trap). `<&0`: a
# background command would otherwise read /dev/null instead of our stdin.
inside_t() {
    local limit=$1 rc=0
    shift
    timeout "$limit" nsenter -t "$cpid" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@" <&0 &
    inflight=$!
    wait "$inflight" || rc=$?
    inflight=
    return "$rc"
}
# inside COMMAND...: the same, for commands that take a moment (systemctl show, cat, journalctl).
inside() { inside_t 60 "$@"; }

deadline=$((SECONDS + 60))
while :; do
    state=$(inside_t 30 systemctl is-system-running --wait 2>/dev/null) || true
    [[ $state == running || $state == degraded ]] && break
    alive "$nspawn_pid" || fail_with_log "systemd-nspawn exited during the boot$boot_hint" "$work/nspawn.log"
    ((SECONDS < deadline)) ||
        fail_with_log "the container's systemd is not up after 60 s (state: ${state:-none})" "$work/nspawn.log"
    sleep 0.1
done
say "container up (pid 1 = $cpid on the host, state $state)"
if [[ $state == degraded ]]; then
    say "failed units in the container (not ours):"
    inside systemctl --failed --no-legend --no-pager >&2 || true
fi

# ---- helpers for the checks ---------------------------------------------------------------
unit_prop() { inside systemctl show -p "$1" --value "$UNIT"; }

# Everything a failed check needs to see: the unit's state and its journal.
fail_unit() {
    say "---- systemctl status $UNIT"
    inside systemctl status --no-pager --full "$UNIT" >&2 || true
    say "---- journalctl -u $UNIT (last 80 lines)"
    inside journalctl -u "$UNIT" --no-pager -n 80 >&2 || true
    say "----"
    fail "$1"
}

# The journal's current position: journal_since CURSOR then shows only what came later.
journal_cursor() { inside journalctl -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p'; }
journal_since() { inside journalctl -u "$UNIT" --no-pager -o cat --after-cursor="$1"; }
journal_has() { journal_since "$1" | grep -qF -- "$2"; }

# wait_until SECONDS COMMAND...: polls COMMAND until it succeeds; 1 if SECONDS pass first.
wait_until() {
    local deadline=$(($(now_ms) + $1 * 1000))
    shift
    until "$@"; do
        (($(now_ms) < deadline)) || return 1
        sleep 0.2
    done
}

# make_job ID: the job folder /srv/jobs/ID with job.json from stdin, as a controller makes one
# (owned by JOB_OWNER, modes 0755 and 0644: the jobs folder above it keeps the pool out).
make_job() {
    inside sh -c 'set -e
        d=$1/$2; mkdir "$d"; cat >"$d/job.json"
        chown -R "$3:$3" "$d"; chmod 0755 "$d"; chmod 0644 "$d/job.json"' \
        sh "$JOBS" "$1" "$JOB_OWNER" || fail "could not create the job folder $JOBS/$1"
}

# submit ID: publishes {"id": ID} on jobs.pending from the host (examples/submit.rs), which
# prints the result message from jobs.results.ID when it comes.
submit_job() {
    "$submit" "$nats_url" "$1" >"$work/result.$1" 2>"$work/submit.$1.log" &
    submit_pids[$1]=$!
}

# wait_result ID SECONDS: waits for the result of ID; sets `result` to the message.
wait_result() {
    local id=$1 pid=${submit_pids[$1]}
    if ! wait_until "$2" submit_done "$pid"; then
        fail_unit "no result on jobs.results.$id within $2 s"
    fi
    local rc=0
    wait "$pid" || rc=$?
    unset "submit_pids[$id]"
    [[ $rc == 0 ]] || fail_with_log "examples/submit for $id failed (exit $rc)" "$work/submit.$id.log"
    result=$(tail -n1 "$work/result.$id")
    say "result of $id: $result"
}
submit_done() { ! alive "$1"; }

# json_field JSON NAME: the value of a top-level string or number field of a one-line message.
json_field() { sed -n "s/.*\"$2\":\"\{0,1\}\([^\",}]*\).*/\1/p" <<<"$1"; }

# expect_result ID STATUS ATTEMPT: checks the result message of ID.
expect_result() {
    local status attempt
    status=$(json_field "$result" status)
    attempt=$(json_field "$result" attempt)
    [[ $(json_field "$result" id) == "$1" ]] || fail_unit "the result is not for $1: $result"
    [[ $status == "$2" ]] || fail_unit "job $1 ended '$status', expected '$2': $result"
    [[ $attempt == "$3" ]] || fail_unit "job $1 finished on attempt '$attempt', expected $3: $result"
}

# wait_ready CURSOR: the supervisor started after CURSOR logs `ready for jobs` (its consumer is
# bound). With Type=notify (the unit's: READY=1 once the consumer is bound) the start returning
# means ready: the line must then be there at once (allowing only for the journal, which reads
# the log and the notification from different sockets). With Type=exec (a drop-in could set it)
# `systemctl start` returns once the binary runs, before it is connected: wait for the line.
wait_ready() {
    local limit=30
    [[ $(unit_prop Type) == notify ]] && limit=2
    wait_until "$limit" journal_has "$1" "ready for jobs" ||
        fail_unit "the supervisor did not log 'ready for jobs' within ${limit}s of the start (Type=$(unit_prop Type))"
}

# start_unit VERB: systemctl VERB (start, restart) and waits until the supervisor is ready.
start_unit() {
    local cursor
    cursor=$(journal_cursor)
    inside_t 60 systemctl "$1" "$UNIT" || fail_unit "systemctl $1 $UNIT failed"
    [[ $(unit_prop ActiveState) == active ]] || fail_unit "$UNIT is not active after systemctl $1"
    wait_ready "$cursor"
}

# step_log_has ID TEXT: results/step_0.log of the job contains TEXT (logs are streamed there).
step_log_has() { inside grep -qF -- "$2" "$JOBS/$1/results/step_0.log" 2>/dev/null; }

# results_owned_by_job_owner ID: results/ and everything in it belong to the job folder's owner.
results_owned_by_job_owner() {
    local owner others
    owner=$(inside stat -c %u "$JOBS/$1")
    others=$(inside find "$JOBS/$1/results" ! -uid "$owner" -printf '%u %p\n')
    [[ -z $others ]] || fail_unit "results/ of $1 is not all the job folder owner's (uid $owner): $others"
}

# ---- 6. install and configure -------------------------------------------------------------
phase "install and configure"
inside sh -c 'cat >/root/nats-fs-worker.deb' <"$deb" || fail "could not copy the package in"
inside_t 300 apt-get install -y --no-install-recommends /root/nats-fs-worker.deb \
    </dev/null >"$work/install.log" 2>&1 || fail_with_log "apt-get install of the package failed" "$work/install.log"
[[ $(inside dpkg-query -W -f='${db:Status-Status}' "$PKG") == installed ]] ||
    fail_with_log "$PKG is not installed" "$work/install.log"
inside sh -c 'cat >>"$1"' sh "$ENV_FILE" <<EOF || fail "could not edit $ENV_FILE"

# ---- Set by test-systemd.sh ----
NATS_URL=$nats_url
NATS_JOBS_DIR=$JOBS
NATS_FS_ACK_WAIT=$ACK_WAIT
NATS_FS_DRAIN_TIMEOUT=$DRAIN_TIMEOUT
EOF
inside sh -c 'set -e; mkdir -p "$(dirname "$1")"; printf "[Service]\nReadWritePaths=%s\n" "$2" >"$1"' \
    sh "$DROP_IN" "$JOBS" || fail "could not write $DROP_IN"
# The controller's jobs folder, closed to everyone else: the worker (root) reads and writes it
# as its owner, the share user; steps cannot reach it.
inside install -d -o "$JOB_OWNER" -g "$JOB_OWNER" -m 0700 "$JOBS" || fail "could not create $JOBS"
inside systemctl daemon-reload || fail "systemctl daemon-reload failed"

# ---- 7a. start ----------------------------------------------------------------------------
phase "a. start: active, ready"
start_unit start
# The status line the supervisor sends (STATUS=), as `systemctl status` shows it.
status_is() { [[ $(unit_prop StatusText) == "$1" ]]; }
if [[ $(unit_prop Type) == notify ]]; then
    wait_until 5 status_is "running 0 of 1 jobs" ||
        fail_unit "systemctl status says '$(unit_prop StatusText)', expected 'running 0 of 1 jobs'"
    # WatchdogSec= is set: the supervisor must keep feeding it (a starved watchdog kills it).
    [[ $(unit_prop WatchdogUSec) != 0 ]] || fail_unit "the unit sets no watchdog"
fi
say "active, ready for jobs (Type=$(unit_prop Type), MainPID $(unit_prop MainPID), status '$(unit_prop StatusText)')"
# The hardening README.md and OPERATOR.md state: systemd's own exposure score for the unit
# (0 is fully locked down, 10 not at all), no worse than the 3.8 they give.
inside systemd-analyze security --no-pager "$UNIT" >"$work/security.txt" 2>&1 ||
    fail_with_log "systemd-analyze security $UNIT failed" "$work/security.txt"
exposure=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' "$work/security.txt")
[[ -n $exposure ]] || fail_with_log "systemd-analyze security gave no exposure level" "$work/security.txt"
awk -v e="$exposure" 'BEGIN { exit !(e <= 3.8) }' ||
    fail_with_log "systemd-analyze security scores $UNIT $exposure, worse than the documented 3.8" "$work/security.txt"
say "systemd-analyze security: exposure $exposure"

# ---- 7b. a job ----------------------------------------------------------------------------
phase "b. job as a pool user, no privileges, first in line for the OOM killer"
make_job ok <<'EOF'
{"steps": ["id -un; id -u; cat /proc/self/status | grep -E 'NoNewPrivs|CapEff'; echo oom $(cat /proc/self/oom_score_adj); echo nproc $(awk '/^Max processes/ { print $3 }' /proc/self/limits); echo core $(ulimit -c)"]}
EOF
submit_job ok
wait_result ok 30
expect_result ok success 1
log=$(inside cat "$JOBS/ok/results/step_0.log") || fail_unit "job ok has no results/step_0.log"
user=$(sed -n 1p <<<"$log")
uid=$(sed -n 2p <<<"$log")
[[ " ${POOL_USERS[*]} " == *" $user "* ]] || fail_unit "the step ran as '$user', not a user of the pool (${POOL_USERS[*]}): $log"
[[ $uid != 0 && $uid == "$(inside id -u "$user")" ]] || fail_unit "the step ran with uid '$uid' ($user): $log"
[[ $(awk '$1 == "NoNewPrivs:" { print $2 }' <<<"$log") == 1 ]] || fail_unit "the step does not have NoNewPrivs 1: $log"
[[ $(awk '$1 == "CapEff:" { print $2 }' <<<"$log") == 0000000000000000 ]] || fail_unit "the step has capabilities: $log"
# The packaged limits: oom_score_adj 1000 for jobs, NATS_FS_MAX_PROCESSES=1024, no core dumps.
[[ $(awk '$1 == "oom" { print $2 }' <<<"$log") == 1000 ]] || fail_unit "the step's oom_score_adj is not 1000: $log"
[[ $(awk '$1 == "nproc" { print $2 }' <<<"$log") == 1024 ]] || fail_unit "the step's process limit is not 1024: $log"
[[ $(awk '$1 == "core" { print $2 }' <<<"$log") == 0 ]] || fail_unit "the step may dump core: $log"
supervisor_oom=$(inside cat "/proc/$(unit_prop MainPID)/oom_score_adj")
# Lowering an OOM score needs CAP_SYS_RESOURCE, which the container has only if this machine
# does (some sandboxes take it away even from root).
host_caps=$(awk '$1 == "CapBnd:" { print $2 }' /proc/self/status)
if (( (0x$host_caps >> 24) & 1 )); then
    [[ $supervisor_oom -lt 0 ]] || fail_unit "the supervisor's oom_score_adj is $supervisor_oom, not below 0"
else
    say "NOTE: this machine has no CAP_SYS_RESOURCE, so the supervisor keeps oom_score_adj $supervisor_oom; not checked"
fi
[[ $(unit_prop OOMPolicy) == continue ]] || fail_unit "OOMPolicy is $(unit_prop OOMPolicy), not continue"
[[ $(unit_prop TasksMax) == 8192 ]] || fail_unit "TasksMax is $(unit_prop TasksMax), not 8192"
results_owned_by_job_owner ok
say "ran as $user (uid $uid), NoNewPrivs 1, CapEff 0, oom_score_adj 1000 (supervisor $supervisor_oom), nproc 1024, no core; results/ belongs to uid $JOB_OWNER"

# ---- 7c. drain ----------------------------------------------------------------------------
phase "c. stop drains a running job"
make_job drain <<EOF
{"steps": ["echo started; sleep $DRAIN_JOB_SECONDS; echo finished > finished.txt"]}
EOF
submit_job drain
wait_until 30 step_log_has drain started || fail_unit "the job drain did not start within 30 s"
seen_ms=$(now_ms)
if [[ $(unit_prop Type) == notify ]]; then
    wait_until 5 status_is "running 1 of 1 jobs" ||
        fail_unit "systemctl status says '$(unit_prop StatusText)' while a job runs"
fi
inside_t 120 systemctl stop "$UNIT" || fail_unit "systemctl stop failed"
stop_ms=$(($(now_ms) - seen_ms))
wait_result drain 20
expect_result drain success 1
inside test -f "$JOBS/drain/results/finished.txt" || fail_unit "the drained job did not finish (no results/finished.txt)"
[[ $(unit_prop ActiveState) == inactive ]] || fail_unit "$UNIT is $(unit_prop ActiveState) after systemctl stop"
[[ $(unit_prop Result) == success ]] || fail_unit "the stop ended with Result=$(unit_prop Result), expected success"
[[ $(unit_prop ExecMainStatus) == 0 ]] || fail_unit "the supervisor exited $(unit_prop ExecMainStatus) after the drain, expected 0"
# The job had about DRAIN_JOB_SECONDS minus the moment we saw it start to go.
((stop_ms > 3000 && stop_ms < 20000)) ||
    fail_unit "systemctl stop took $(fmt_ms "$stop_ms") with a ${DRAIN_JOB_SECONDS}s job running: expected more than 3 s (the job's rest) and less than 20 s"
say "the stop waited $(fmt_ms "$stop_ms") for the job, which finished; exit status 0, Result=success"

# ---- 7d. kill -9 --------------------------------------------------------------------------
phase "d. kill -9: restart, redelivery"
start_unit start
make_job crash <<'EOF'
{"steps": ["if [ \"$JOB_ATTEMPT\" = 1 ]; then echo attempt-1-started; sleep 60; exit 1; fi; echo \"attempt-$JOB_ATTEMPT-ok\""]}
EOF
submit_job crash
wait_until 30 step_log_has crash attempt-1-started || fail_unit "the job crash did not start within 30 s"
main_pid=$(unit_prop MainPID)
restarts=$(unit_prop NRestarts)
cursor=$(journal_cursor)
inside sh -c 'kill -9 "$1"' sh "$main_pid" || fail_unit "could not kill -9 the supervisor (pid $main_pid in the container)"
# RestartSec=5s, then the ack wait ($ACK_WAIT) since the last progress ack: well within 40 s.
restarted() { [[ $(unit_prop NRestarts) -gt $restarts && $(unit_prop ActiveState) == active ]]; }
wait_until 20 restarted || fail_unit "systemd did not restart the supervisor within 20 s of kill -9 (NRestarts $(unit_prop NRestarts))"
[[ $(unit_prop MainPID) != "$main_pid" ]] || fail_unit "MainPID did not change after the restart"
wait_ready "$cursor"
wait_result crash 40
expect_result crash success 2
step_log_has crash attempt-2-ok || fail_unit "results/step_0.log of crash lacks attempt-2-ok"
results_owned_by_job_owner crash
say "restarted (NRestarts $restarts -> $(unit_prop NRestarts)); the job finished on attempt 2"

# ---- 7e. a bad setting --------------------------------------------------------------------
phase "e. bad setting: failed, exit 2, no loop"
bad=NATS_FS_KILL_GRACE=notaduration
inside sh -c 'printf "%s\n" "$2" >>"$1"' sh "$ENV_FILE" "$bad" || fail "could not edit $ENV_FILE"
cursor=$(journal_cursor)
restart_rc=0
inside_t 120 systemctl restart "$UNIT" 2>"$work/restart.err" || restart_rc=$?
((restart_rc != 124)) || fail_unit "systemctl restart hung with $bad"
# Type=notify (the unit's): the start itself fails (no READY=1 before the exit). Type=exec: the
# restart would return 0 as soon as the binary runs, and fail right after.
if [[ $(unit_prop Type) == notify ]]; then
    ((restart_rc != 0)) || fail_unit "systemctl restart succeeded with $bad (Type=notify)"
fi
is_failed() { [[ $(unit_prop ActiveState) == failed ]]; }
wait_until 15 is_failed || fail_unit "$UNIT is $(unit_prop ActiveState), not failed, with $bad"
[[ $(unit_prop ExecMainStatus) == 2 ]] || fail_unit "the supervisor exited $(unit_prop ExecMainStatus) with $bad, expected 2"
[[ $(unit_prop Result) == exit-code ]] || fail_unit "Result=$(unit_prop Result) with $bad, expected exit-code"
named=
for name in NATS_FS_KILL_GRACE --kill-grace; do
    if journal_has "$cursor" "$name"; then named=$name && break; fi
done
[[ -n $named ]] || fail_unit "journalctl -u $UNIT does not name the bad setting (NATS_FS_KILL_GRACE or --kill-grace)"
restarts=$(unit_prop NRestarts)
# Longer than RestartSec= (5 s): a restart loop would have restarted it by then.
restart_sec=$(unit_prop RestartUSec)
[[ $restart_sec =~ ^([0-9]+)s$ ]] && restart_sec=${BASH_REMATCH[1]} || restart_sec=5
sleep $((restart_sec + 2))
[[ $(unit_prop NRestarts) == "$restarts" ]] || fail_unit "$UNIT is restarted in a loop with $bad (NRestarts $restarts -> $(unit_prop NRestarts))"
is_failed || fail_unit "$UNIT left the failed state with $bad: $(unit_prop ActiveState)"
say "restart exit $restart_rc (Type=$(unit_prop Type)); failed, exit status 2, '$named' in the journal, NRestarts stays $restarts"
error_line=$(journal_since "$cursor" | grep -F -- "$named" | head -n1)
say "the journal says: $error_line"
inside sed -i "\\#^$bad\$#d" "$ENV_FILE" || fail "could not restore $ENV_FILE"
inside grep -qxF -- "$bad" "$ENV_FILE" && fail "could not remove $bad from $ENV_FILE"
inside systemctl reset-failed "$UNIT" || true
start_unit start

# ---- 7f. upgrade --------------------------------------------------------------------------
phase "f. upgrade keeps edited settings"
edit_comment="# edited by test-systemd.sh"
edit_setting=NATS_FS_CONCURRENCY=2
inside sh -c 'printf "%s\n%s\n" "$2" "$3" >>"$1"' sh "$ENV_FILE" "$edit_comment" "$edit_setting" ||
    fail "could not edit $ENV_FILE"
start_unit restart
main_pid=$(unit_prop MainPID)
cursor=$(journal_cursor)
inside sh -c 'cat >/root/nats-fs-worker-next.deb' <"$work/next.deb" || fail "could not copy the upgrade in"
# confold: keep the admin's file when the packaged one changed too (it did); no question asked.
inside_t 600 apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold \
    /root/nats-fs-worker-next.deb </dev/null >"$work/upgrade.log" 2>&1 ||
    fail_with_log "apt-get install of the upgrade failed" "$work/upgrade.log"
[[ $(inside dpkg-query -W -f='${Version}' "$PKG") == "$next_version" ]] ||
    fail_with_log "the upgrade did not take (version $(inside dpkg-query -W -f='${Version}' "$PKG"))" "$work/upgrade.log"
inside grep -qxF -- "$edit_comment" "$ENV_FILE" || fail_with_log "the upgrade lost the comment added to $ENV_FILE" "$work/upgrade.log"
inside grep -qxF -- "$edit_setting" "$ENV_FILE" || fail_with_log "the upgrade lost $edit_setting in $ENV_FILE" "$work/upgrade.log"
inside grep -qxF -- "NATS_URL=$nats_url" "$ENV_FILE" || fail_with_log "the upgrade lost NATS_URL in $ENV_FILE" "$work/upgrade.log"
inside grep -qxF -- "$packaged_marker" "$ENV_FILE" && fail_with_log "the upgrade replaced the edited $ENV_FILE" "$work/upgrade.log"
[[ $(inside stat -c '%U %G %a' "$ENV_FILE") == "root root 640" ]] ||
    fail "$ENV_FILE is $(inside stat -c '%U %G %a' "$ENV_FILE") after the upgrade, expected root root 640"
inside grep -qxF -- "$packaged_marker" "$ENV_FILE.dpkg-dist" ||
    fail_with_log "the new packaged settings are not in $ENV_FILE.dpkg-dist" "$work/upgrade.log"
# "A running service is restarted after the upgrade" (OPERATOR.md): a new process, ready, with
# the kept settings.
[[ $(unit_prop ActiveState) == active ]] || fail_unit "$UNIT is $(unit_prop ActiveState) after the upgrade"
[[ $(unit_prop MainPID) != "$main_pid" ]] || fail_unit "the upgrade did not restart the running $UNIT (MainPID $main_pid)"
wait_ready "$cursor"
journal_has "$cursor" "concurrency=2" || fail_unit "the restarted supervisor does not run with $edit_setting"
make_job after-upgrade <<'EOF'
{"steps": ["echo upgraded"]}
EOF
submit_job after-upgrade
wait_result after-upgrade 30
expect_result after-upgrade success 1
say "version $next_version; edit kept (new packaged file in $ENV_FILE.dpkg-dist); restarted and runs jobs"

# ---- 7g. purge ----------------------------------------------------------------------------
phase "g. purge"
inside_t 600 apt-get purge -y "$PKG" </dev/null >"$work/purge.log" 2>&1 ||
    fail_with_log "apt-get purge failed" "$work/purge.log"
state=$(inside dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null || true)
[[ -z $state || $state == not-installed ]] || fail_with_log "$PKG is still known to dpkg ($state)" "$work/purge.log"
for user in "${POOL_USERS[@]}"; do
    inside getent passwd "$user" >/dev/null && fail_with_log "the purge left the user $user" "$work/purge.log"
done
inside getent group "$GROUP" >/dev/null && fail_with_log "the purge left the group $GROUP" "$work/purge.log"
for gone in /var/lib/nats-fs/workspaces /var/lib/nats-fs "$ENV_FILE" "$ENV_FILE.dpkg-dist" \
    /usr/lib/systemd/system/$UNIT.service /usr/bin/nats-fs-supervisor /usr/bin/nats-fs-runner; do
    inside test -e "$gone" && fail_with_log "the purge left $gone" "$work/purge.log"
done
[[ $(unit_prop ActiveState) != active ]] || fail_with_log "$UNIT still runs after the purge" "$work/purge.log"
# Job folders are data: never touched.
inside test -f "$JOBS/ok/job.json" || fail_with_log "the purge touched the job folders in $JOBS" "$work/purge.log"
say "users, group, workspaces and settings gone; job folders kept"

# ---- systemd's own complaints -------------------------------------------------------------
phase "systemd warnings about the unit"
# Over the whole run: what systemd (pid 1) said about the unit file or its drop-in when it
# parsed them ("<file>:<line>: Unknown key ..., ignoring"), and processes of the service it found
# still running when it started it again (the cgroup was not cleaned up).
inside journalctl -b --no-pager -o cat _PID=1 >"$work/systemd.log" || fail "could not read the container's journal"
grep -E "$UNIT\.service(\.d/[^:]*)?:[0-9]+: |[Ll]eft-over process" "$work/systemd.log" >"$work/complaints" || true
[[ ! -s $work/complaints ]] || fail_with_log "systemd complained about $UNIT during the run" "$work/complaints"

phase_done
