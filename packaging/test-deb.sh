#!/usr/bin/env bash
# Tests the Debian package nats-fs-worker end to end.
#
#   packaging/test-deb.sh        from any folder; exit 0 when every check passed
#
# Always: builds the package (build-deb.sh), checks its files, modes, control fields,
# conffiles and maintainer scripts, its manual pages (they document the real options) and
# shell completions, runs lintian on it (any E: or W: tag fails; as root, lintian is installed
# with apt-get when missing, otherwise skipped with a message), and checks the systemd unit
# with `systemd-analyze verify` (any output is a failure: verify exits 0 on unknown keys) and
# `systemd-analyze security` (fails above EXPOSURE_MAX) when systemd-analyze is there.
# As root only: installs the package, checks the group, the pool of users, the settings, the
# unit, folders and binaries, runs a dry run through the installed runner and privilege drop
# (as nats-fs-1), edits /etc/default/nats-fs-supervisor, reinstalls and upgrades (with the user
# nats-fs of 0.1.0 present, as after an upgrade from it) and checks the edit and the users
# survived, then purges and checks that everything the package created is gone, nats-fs too.
# The package is never left installed, nor a user or the group: a trap purges and removes
# them, also on failure. It refuses to run over an existing installation, or when the group
# nats-fs or any of the users nats-fs, nats-fs-1 ... nats-fs-4 exists.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

PKG=nats-fs-worker
UNIT=nats-fs-supervisor.service
UNIT_PATH=/usr/lib/systemd/system/$UNIT
ENV_FILE=/etc/default/nats-fs-supervisor
# The group and the pool of runner users the postinst creates (NATS_FS_RUN_AS in ENV_FILE).
GROUP=nats-fs
POOL_USERS=(nats-fs-1 nats-fs-2 nats-fs-3 nats-fs-4)
POOL_SETTING=NATS_FS_RUN_AS=nats-fs-1,nats-fs-2,nats-fs-3,nats-fs-4
# The single runner user of 0.1.0: never created any more, left alone by upgrades, purged.
LEGACY_USER=nats-fs
ALL_USERS=("${POOL_USERS[@]}" "$LEGACY_USER")
STATE_DIR=/var/lib/nats-fs
# Manual pages and completions build-deb.sh generates with `--generate` (hidden from --help).
MAN_PAGES=(/usr/share/man/man1/nats-fs-supervisor.1.gz /usr/share/man/man1/nats-fs-runner.1.gz)
COMPLETIONS=()
for bin in nats-fs-supervisor nats-fs-runner; do
    COMPLETIONS+=(/usr/share/bash-completion/completions/$bin /usr/share/zsh/vendor-completions/_$bin
        /usr/share/fish/vendor_completions.d/$bin.fish)
done
# `systemd-analyze security` exposure ×10 (the unit scores 3.8 today): fails if hardening is lost.
EXPOSURE_MAX=45

say() { printf 'test-deb: %s\n' "$*" >&2; }
fail() {
    printf 'test-deb: FAIL: %s\n' "$*" >&2
    exit 1
}

work=$(mktemp -d /tmp/test-deb.XXXXXX)
# Set once we may have changed the system; the trap then undoes whatever is left.
touched_system=0

# State of the package in dpkg's database: installed, config-files, half-configured, … or "".
pkg_state() { dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null || true; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $touched_system == 1 ]]; then
        local state
        state=$(pkg_state)
        if [[ -n $state && $state != not-installed ]]; then
            say "cleanup: purging $PKG (state: $state)"
            DEBIAN_FRONTEND=noninteractive dpkg --purge --force-all "$PKG" >"$work/cleanup.log" 2>&1 ||
                { say "cleanup: dpkg --purge failed:"; cat "$work/cleanup.log" >&2; }
        fi
        # Whatever a half-run install or a broken postrm left behind (all of it was absent at
        # the start: checked below).
        local user
        for user in "${ALL_USERS[@]}"; do
            if getent passwd "$user" >/dev/null; then userdel "$user" || true; fi
        done
        if getent group "$GROUP" >/dev/null; then groupdel "$GROUP" || true; fi
        rm -rf "$STATE_DIR"
    fi
    rm -rf "$work"
    if [[ $rc != 0 ]]; then
        say "FAILED (exit $rc)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Shows a log file and fails.
fail_with_log() {
    say "---- $2"
    cat "$2" >&2
    say "----"
    fail "$1"
}

# ---- build --------------------------------------------------------------------------------
started=$SECONDS
say "building the package"
out=$("$here/build-deb.sh") || fail "packaging/build-deb.sh failed"
deb=${out##*$'\n'}
[[ -f $deb ]] || fail "build-deb.sh printed '$deb', which is not a file"
say "built $deb in $((SECONDS - started))s"

# ---- contents -----------------------------------------------------------------------------
say "checking the contents (dpkg-deb -c)"
# "mode owner path" per entry, e.g. "-rw-r----- 0/0 ./etc/default/nats-fs-supervisor".
dpkg-deb -c "$deb" | awk '{ print $1, $2, $6 }' >"$work/contents"
expect_entry() {
    grep -qxF -- "$1" "$work/contents" ||
        fail_with_log "the package lacks '$1' (mode owner path)" "$work/contents"
}
expect_entry "-rwxr-xr-x 0/0 ./usr/bin/nats-fs-supervisor"
expect_entry "-rwxr-xr-x 0/0 ./usr/bin/nats-fs-runner"
expect_entry "-rw-r--r-- 0/0 .$UNIT_PATH"
expect_entry "-rw-r----- 0/0 .$ENV_FILE"
expect_entry "-rw-r--r-- 0/0 ./usr/share/doc/$PKG/README.Debian"
expect_entry "-rw-r--r-- 0/0 ./usr/share/doc/$PKG/copyright"
expect_entry "-rw-r--r-- 0/0 ./usr/share/doc/$PKG/changelog.Debian.gz"
expect_entry "-rw-r--r-- 0/0 ./usr/share/lintian/overrides/$PKG"
for path in "${MAN_PAGES[@]}" "${COMPLETIONS[@]}"; do
    expect_entry "-rw-r--r-- 0/0 .$path"
done
if grep -q "^[^ ]* [^ ]* \./var/" "$work/contents"; then
    fail_with_log "the package ships files under /var (the postinst creates $STATE_DIR)" "$work/contents"
fi

# The packaged copies must be the files in packaging/ (not stale ones).
dpkg-deb -x "$deb" "$work/root"
cmp -s "$work/root$UNIT_PATH" "$here/nats-fs-supervisor.service" ||
    fail "the packaged unit differs from packaging/nats-fs-supervisor.service"
cmp -s "$work/root$ENV_FILE" "$here/nats-fs-supervisor.default" ||
    fail "the packaged $ENV_FILE differs from packaging/nats-fs-supervisor.default"
for bin in nats-fs-supervisor nats-fs-runner; do
    help=$("$work/root/usr/bin/$bin" --help) || fail "the packaged $bin --help failed"
    [[ $help != *--generate* ]] || fail "$bin --help shows the packaging option --generate"
done
# The first line of the changelog, "nats-fs-worker (VERSION) unstable; urgency=low", names
# the package's version (lintian checks the rest of its syntax).
zcat "$work/root/usr/share/doc/$PKG/changelog.Debian.gz" >"$work/changelog" ||
    fail "changelog.Debian.gz is not gzip data"
[[ $(head -n1 "$work/changelog") == "$PKG ($(dpkg-deb -f "$deb" Version)) "* ]] ||
    fail_with_log "the first entry of changelog.Debian.gz is not the package's version" "$work/changelog"

# ---- manual pages and completions ---------------------------------------------------------
say "checking the manual pages and completions"
# The text of a manual page as man shows it (plain ASCII), or its roff source with \- as -.
man_text() {
    if command -v man >/dev/null; then
        # Not a terminal: man-db formats plain text (no overstriking, ASCII hyphens in C).
        LC_ALL=C MANWIDTH=200 man -l "$1" 2>/dev/null
    else
        zcat "$1" | sed 's/\\-/-/g'
    fi
}
# expect_man PAGE OPTION...: the page documents each option, and not --generate.
expect_man() {
    local page=$work/root$1 text option
    shift
    [[ -s $page ]] || fail "$page is empty"
    gzip -t "$page" 2>/dev/null || fail "$page is not gzip data"
    text=$(man_text "$page")
    [[ -n $text ]] || fail "$page shows nothing"
    for option in "$@"; do
        grep -qF -- "$option" <<<"$text" || fail "the manual page $page does not mention $option"
    done
    if grep -qF -- --generate <<<"$text"; then fail "the manual page $page shows --generate"; fi
}
expect_man /usr/share/man/man1/nats-fs-supervisor.1.gz --run-as --lock-bucket --jobs-dir --concurrency NATS_URL
expect_man /usr/share/man/man1/nats-fs-runner.1.gz --job --pipe --workspaces-dir
# expect_completion FILE FIRST-LINE-PATTERN OPTION: non-empty, of its shell, completes OPTION.
expect_completion() {
    local file=$work/root$1
    [[ -s $file ]] || fail "$file is empty"
    grep -qE -- "$2" "$file" || fail_with_log "$file does not look like a completion ('$2')" "$file"
    grep -qF -- "$3" "$file" || fail_with_log "$file does not complete $3" "$file"
}
for bin in nats-fs-supervisor nats-fs-runner; do
    case $bin in
        nats-fs-supervisor) option=lock-bucket ;;
        *) option=job ;;
    esac
    expect_completion "/usr/share/bash-completion/completions/$bin" "^ *complete -F [^ ]+ .* $bin\$" "--$option"
    bash -n "$work/root/usr/share/bash-completion/completions/$bin" || fail "the bash completion of $bin is not valid bash"
    expect_completion "/usr/share/zsh/vendor-completions/_$bin" "^#compdef $bin\$" "--$option"
    expect_completion "/usr/share/fish/vendor_completions.d/$bin.fish" "^complete -c $bin " "-l $option"
done

# ---- lintian ------------------------------------------------------------------------------
if ! command -v lintian >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "lintian is missing: installing it with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends lintian \
        </dev/null >"$work/apt-lintian.log" 2>&1; then
        # A fresh machine may have no package lists yet.
        apt-get update >>"$work/apt-lintian.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends lintian \
            </dev/null >>"$work/apt-lintian.log" 2>&1 ||
            fail_with_log "could not install lintian" "$work/apt-lintian.log"
    fi
fi
if command -v lintian >/dev/null; then
    say "running lintian"
    # Errors and warnings fail (overridden ones excepted: packaging/debian/lintian-overrides
    # says why each is right); info, pedantic and notes are shown only. "running with root
    # privileges is not recommended!" goes to stderr and is dropped.
    lintian_rc=0
    lintian --fail-on error,warning --display-info --pedantic "$deb" \
        >"$work/lintian" 2>"$work/lintian.err" || lintian_rc=$?
    if [[ -s $work/lintian ]]; then
        sed 's/^/test-deb: lintian: /' "$work/lintian" >&2
    fi
    if [[ $lintian_rc != 0 ]] || grep -qE '^[EW]: ' "$work/lintian"; then
        cat "$work/lintian.err" >&2
        fail "lintian reported errors or warnings (exit $lintian_rc)"
    fi
else
    say "lintian not found (and not root, or no apt-get): SKIPPING the lintian check (apt-get install lintian)"
fi

# ---- control ------------------------------------------------------------------------------
say "checking the control files (dpkg-deb -I, -e)"
dpkg-deb -I "$deb" >"$work/info"
[[ $(dpkg-deb -f "$deb" Package) == "$PKG" ]] || fail_with_log "Package is not $PKG" "$work/info"
depends=$(dpkg-deb -f "$deb" Depends)
[[ $depends == *adduser* ]] || fail_with_log "Depends lacks adduser (used by the postinst)" "$work/info"
[[ $depends == *libc6* ]] || fail_with_log "Depends lacks libc6 (\$auto)" "$work/info"

dpkg-deb -e "$deb" "$work/control"
ctl=$work/control
[[ $(cat "$ctl/conffiles") == "$ENV_FILE" ]] ||
    fail_with_log "conffiles must list exactly $ENV_FILE" "$ctl/conffiles"
for script in postinst prerm postrm; do
    [[ -x $ctl/$script ]] || fail "the package has no executable $script"
    sh -n "$ctl/$script" || fail "$script is not valid sh"
    if grep -q '#DEBHELPER#' "$ctl/$script"; then
        fail_with_log "#DEBHELPER# was not replaced in $script" "$ctl/$script"
    fi
done
# expect_in FILE PATTERN WHY: a fixed string the script must contain.
expect_in() {
    grep -qF -- "$2" "$ctl/$1" || fail_with_log "$1 lacks '$2' ($3)" "$ctl/$1"
}
expect_in postinst "adduser --system" "creates the runner users"
expect_in postinst "${POOL_USERS[*]}" "creates the pool of NATS_FS_RUN_AS"
expect_in postinst "addgroup --system" "creates the runner group"
expect_in postinst "0711" "workspaces folder mode"
expect_in postinst "deb-systemd-helper update-state $UNIT" "systemd snippets merged"
expect_in postinst "try-restart $UNIT" "restart on upgrade only if running"
if grep -qE "deb-systemd-invoke (start|\\\$_dh_action)" "$ctl/postinst"; then
    fail_with_log "postinst starts the service on a fresh install" "$ctl/postinst"
fi
expect_in prerm "deb-systemd-invoke stop $UNIT" "stop on removal"
expect_in postrm "userdel" "purge removes the users"
expect_in postrm "${POOL_USERS[*]} $LEGACY_USER" "purge removes the pool and the user of 0.1.0"
expect_in postrm "groupdel" "purge removes the group"
# shellcheck disable=SC2016 # the literal text of the script
expect_in postrm 'rm -rf "$WORKSPACES_DIR"' "purge removes the workspaces"
expect_in postrm "deb-systemd-helper purge $UNIT" "systemd snippets merged"

# ---- systemd unit -------------------------------------------------------------------------
if command -v systemd-analyze >/dev/null; then
    say "checking the unit (systemd-analyze verify, security)"
    # verify wants ExecStart= to exist: check a copy that runs the freshly built binary.
    mkdir "$work/units"
    sed "s#^ExecStart=/usr/bin/nats-fs-supervisor#ExecStart=$work/root/usr/bin/nats-fs-supervisor#" \
        "$here/nats-fs-supervisor.service" >"$work/units/$UNIT"
    grep -q "^ExecStart=$work/" "$work/units/$UNIT" || fail "could not point ExecStart= at the build"
    if ! verify=$(systemd-analyze verify --man=no "$work/units/$UNIT" 2>&1) || [[ -n $verify ]]; then
        fail "systemd-analyze verify complained about $UNIT:"$'\n'"$verify"
    fi
    systemd-analyze security --offline=true "$work/units/$UNIT" >"$work/security" 2>&1 || true
    score=$(sed -n 's/.*Overall exposure level for [^:]*: *\([0-9.]* [A-Z]*\).*/\1/p' "$work/security")
    [[ -n $score ]] || fail_with_log "systemd-analyze security printed no score" "$work/security"
    say "systemd-analyze security: exposure $score (maximum allowed $((EXPOSURE_MAX / 10)).$((EXPOSURE_MAX % 10)))"
    systemd-analyze security --offline=true --threshold="$EXPOSURE_MAX" "$work/units/$UNIT" \
        >/dev/null 2>&1 || fail_with_log "the unit's exposure is above the maximum: hardening lost?" "$work/security"
else
    say "systemd-analyze not found: skipping the unit checks"
fi

# ---- install, upgrade, purge (root only) --------------------------------------------------
if [[ $(id -u) != 0 ]]; then
    say "not root: SKIPPING the install/upgrade/purge checks (run as root, e.g. in CI, for those)"
    say "passed (package checks only) in $((SECONDS - started))s"
    exit 0
fi

state=$(pkg_state)
if [[ -n $state && $state != not-installed ]]; then
    fail "$PKG is already on this host (state: $state); refusing to install and purge over it"
fi
for user in "${ALL_USERS[@]}"; do
    getent passwd "$user" >/dev/null && fail "a user $user exists already; refusing (purge would remove it)"
done
getent group "$GROUP" >/dev/null && fail "a group $GROUP exists already; refusing (purge would remove it)"
[[ -e $STATE_DIR ]] && fail "$STATE_DIR exists already; refusing (purge would remove it)"
[[ -e $ENV_FILE ]] && fail "$ENV_FILE exists already; refusing"
touched_system=1
export DEBIAN_FRONTEND=noninteractive

say "installing with apt-get"
if command -v apt-get >/dev/null; then
    apt-get install -y --no-install-recommends "$deb" </dev/null >"$work/install.log" 2>&1 ||
        fail_with_log "apt-get install failed" "$work/install.log"
else
    dpkg -i "$deb" </dev/null >"$work/install.log" 2>&1 || fail_with_log "dpkg -i failed" "$work/install.log"
fi
[[ $(pkg_state) == installed ]] || fail_with_log "$PKG is not installed after the install ($(pkg_state))" "$work/install.log"

# expect_stat PATH "owner group mode"
expect_stat() {
    local got
    got=$(stat -c '%U %G %a' "$1" 2>/dev/null) || fail "$1 is missing"
    [[ $got == "$2" ]] || fail "$1 is '$got' (owner group mode), expected '$2'"
}
check_installed() {
    local user pw uid gid home shell
    getent group "$GROUP" >/dev/null || fail "the group $GROUP does not exist"
    for user in "${POOL_USERS[@]}"; do
        pw=$(getent passwd "$user") || fail "the user $user does not exist"
        IFS=: read -r _ _ uid gid _ home shell <<<"$pw"
        ((uid < 1000)) || fail "$user is not a system user (uid $uid)"
        [[ $(getent group "$gid" | cut -d: -f1) == "$GROUP" ]] ||
            fail "the primary group of $user is not $GROUP (gid $gid)"
        [[ $home == /nonexistent ]] || fail "the home of $user is $home, expected /nonexistent"
        [[ $shell == */nologin ]] || fail "$user has the login shell $shell"
    done
    # The pool is what the service uses, and ProtectProc= hides the jobs from each other.
    grep -qxF "$POOL_SETTING" "$ENV_FILE" || fail "$ENV_FILE does not set $POOL_SETTING"
    grep -qx "ProtectProc=invisible" "$UNIT_PATH" || fail "$UNIT_PATH lacks ProtectProc=invisible"
    expect_stat "$STATE_DIR" "root root 755"
    expect_stat "$STATE_DIR/workspaces" "root root 711"
    expect_stat "$ENV_FILE" "root root 640"
    expect_stat "$UNIT_PATH" "root root 644"
    [[ -x /usr/bin/nats-fs-supervisor && -x /usr/bin/nats-fs-runner ]] || fail "the binaries are missing"
    /usr/bin/nats-fs-supervisor --help >/dev/null || fail "/usr/bin/nats-fs-supervisor --help failed"
    /usr/bin/nats-fs-runner --help >/dev/null || fail "/usr/bin/nats-fs-runner --help failed"
    local page
    for page in "${MAN_PAGES[@]}" "${COMPLETIONS[@]}"; do
        [[ -s $page ]] || fail "$page is missing or empty"
    done
    # Not enabled on install (needs NATS_URL first): no symlink anywhere under /etc/systemd.
    if find /etc/systemd -name "$UNIT" 2>/dev/null | grep -q .; then
        fail "$UNIT got enabled by the install: $(find /etc/systemd -name "$UNIT")"
    fi
}
say "checking the installation"
check_installed
getent passwd "$LEGACY_USER" >/dev/null && fail "a fresh install created the user $LEGACY_USER of 0.1.0"
cmp -s "$ENV_FILE" "$here/nats-fs-supervisor.default" ||
    fail "the installed $ENV_FILE differs from packaging/nats-fs-supervisor.default (the postinst must not edit it)"
# "nats-fs-1:uid nats-fs-2:uid ...": a reinstall or an upgrade must not recreate a user.
pool_uids() {
    local user
    for user in "${POOL_USERS[@]}"; do printf '%s:%s ' "$user" "$(id -u "$user" 2>/dev/null)"; done
}
uids_before=$(pool_uids)
if command -v systemd-analyze >/dev/null; then
    if ! verify=$(systemd-analyze verify --man=no "$UNIT_PATH" 2>&1) || [[ -n $verify ]]; then
        fail "systemd-analyze verify complained about the installed $UNIT_PATH:"$'\n'"$verify"
    fi
fi

# The packaged settings at work, without NATS: a dry run goes through the installed runner,
# the privilege drop to the first user of the pool (nats-fs-1) and the 0711 workspaces folder,
# like a job of the service.
say "dry run with the installed settings"
dry=$work/dry
mkdir -p "$dry"
chmod 0755 "$work" "$dry" # the runner (nats-fs-1) must reach the job folder
printf '%s\n' '{"id": "deb-smoke", "steps": ["id -un > whoami.txt", "echo built > artifact.txt"]}' \
    >"$dry/test-payload.json"
(
    cd "$dry"
    set -a
    # shellcheck disable=SC1090 # the installed env file, as systemd would read it
    . "$ENV_FILE"
    set +a
    exec /usr/bin/nats-fs-supervisor --dry-run --jobs-dir "$dry/jobs"
) >"$work/dry.log" 2>&1 || fail_with_log "the dry run failed" "$work/dry.log"
results=$dry/jobs/deb-smoke/results
grep -q '"status": *"success"' "$results/result.json" 2>/dev/null ||
    fail_with_log "the dry run did not succeed (results/result.json)" "$work/dry.log"
[[ $(cat "$results/whoami.txt" 2>/dev/null) == "${POOL_USERS[0]}" ]] ||
    fail_with_log "the steps did not run as ${POOL_USERS[0]}" "$work/dry.log"
[[ $(cat "$results/artifact.txt" 2>/dev/null) == built ]] ||
    fail_with_log "the artifact was not synced to results/" "$work/dry.log"
# After the job, results/ belongs to the job folder's owner (root here), out of the pool's reach.
[[ $(stat -c %U "$results" "$results/artifact.txt" | sort -u) == root ]] ||
    fail_with_log "results/ was not given back to root, the job folder's owner" "$work/dry.log"
leftover=$(find "$STATE_DIR/workspaces" -mindepth 1 -maxdepth 1 ! -name '.nats-fs-supervisor.lock')
[[ -z $leftover ]] || fail "the dry run left workspaces behind: $leftover"

say "editing $ENV_FILE, then reinstalling the same package (dpkg -i)"
marker="NATS_URL=nats://edited-by-test-deb.invalid:4222"
printf '\n# added by test-deb.sh\n%s\n' "$marker" >>"$ENV_FILE"
check_edit_kept() {
    grep -qxF "$marker" "$ENV_FILE" || fail "$1 lost the edit of $ENV_FILE"
    expect_stat "$ENV_FILE" "root root 640"
    if compgen -G "$ENV_FILE.dpkg-*" >/dev/null; then
        fail "$1 left $(compgen -G "$ENV_FILE.dpkg-*" | tr '\n' ' ')(the packaged file did not change)"
    fi
}
dpkg -i "$deb" </dev/null >"$work/reinstall.log" 2>&1 || fail_with_log "reinstalling with dpkg -i failed" "$work/reinstall.log"
check_edit_kept "the reinstall"
check_installed
[[ $(pool_uids) == "$uids_before" ]] || fail "the reinstall recreated users: $uids_before -> $(pool_uids)"

# As after 0.1.0, whose postinst created the single runner user nats-fs (and the group).
say "creating the user $LEGACY_USER of 0.1.0, as its postinst did"
adduser --system --quiet --ingroup "$GROUP" --home "$STATE_DIR" --no-create-home \
    --shell /usr/sbin/nologin "$LEGACY_USER" </dev/null || fail "could not create the user $LEGACY_USER"
legacy_uid=$(id -u "$LEGACY_USER")

say "upgrading to a newer version of the same package"
# The same package with a higher version: an upgrade as dpkg sees it (postinst configure <old>).
version=$(dpkg-deb -f "$deb" Version)
dpkg-deb -R "$deb" "$work/next"
sed -i "s/^Version: .*/Version: $version+debtest1/" "$work/next/DEBIAN/control"
dpkg-deb --root-owner-group -b "$work/next" "$work/next.deb" >/dev/null
dpkg -i "$work/next.deb" </dev/null >"$work/upgrade.log" 2>&1 || fail_with_log "the upgrade failed" "$work/upgrade.log"
[[ $(dpkg-query -W -f='${Version}' "$PKG") == "$version+debtest1" ]] || fail "the upgrade did not take"
check_edit_kept "the upgrade"
check_installed
[[ $(pool_uids) == "$uids_before" ]] || fail "the upgrade recreated users: $uids_before -> $(pool_uids)"
[[ $(id -u "$LEGACY_USER" 2>/dev/null) == "$legacy_uid" ]] ||
    fail "the upgrade removed or recreated the user $LEGACY_USER of 0.1.0"

say "purging with apt-get"
if command -v apt-get >/dev/null; then
    apt-get purge -y "$PKG" </dev/null >"$work/purge.log" 2>&1 || fail_with_log "apt-get purge failed" "$work/purge.log"
else
    dpkg --purge "$PKG" </dev/null >"$work/purge.log" 2>&1 || fail_with_log "dpkg --purge failed" "$work/purge.log"
fi
state=$(pkg_state)
[[ -z $state || $state == not-installed ]] || fail_with_log "$PKG is still known to dpkg ($state)" "$work/purge.log"
for user in "${ALL_USERS[@]}"; do
    getent passwd "$user" >/dev/null && fail_with_log "the purge left the user $user" "$work/purge.log"
done
getent group "$GROUP" >/dev/null && fail_with_log "the purge left the group $GROUP" "$work/purge.log"
[[ -e $STATE_DIR ]] && fail_with_log "the purge left $STATE_DIR" "$work/purge.log"
for gone in "$ENV_FILE" "$UNIT_PATH" /usr/bin/nats-fs-supervisor /usr/bin/nats-fs-runner \
    "${MAN_PAGES[@]}" "${COMPLETIONS[@]}"; do
    [[ -e $gone ]] && fail_with_log "the purge left $gone" "$work/purge.log"
done
# Neither an enablement link nor the mask that `remove` sets (unmasked again by the purge).
if find /etc/systemd -name "$UNIT" 2>/dev/null | grep -q .; then
    fail "the purge left $(find /etc/systemd -name "$UNIT" | tr '\n' ' ')"
fi
touched_system=0

say "passed in $((SECONDS - started))s"
