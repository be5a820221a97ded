#!/usr/bin/env bash
# Starts a private moto_server on a free loopback port for the tests and the demo.
#
# Source it (`. scripts/moto.sh`) to get, in the current shell:
#   AWS_ENDPOINT_URL=http://127.0.0.1:PORT, dummy credentials, AWS_REGION=us-east-1,
#   MOTO_PID, and an EXIT trap that stops moto (chained with any earlier EXIT trap).
# Run it directly (`scripts/moto.sh`) to start moto in the foreground for manual work;
# it prints the exports to paste and stops moto on Ctrl-C.
#
# moto is installed into .venv at the repository root (pinned, see MOTO_VERSION).

MOTO_VERSION="5.2.1"

_moto_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_moto_die() {
    echo "moto.sh: $*" >&2
    return 1 2>/dev/null || exit 1
}

# Prints the installed moto version for interpreter $1 (with PYTHONPATH $2), or nothing.
# Reads the same dist-info metadata as `pip show moto`.
_moto_installed_version() {
    PYTHONPATH="${2:-}" "$1" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null || true
}

# Installs moto[server] into $_moto_root/.venv (or reuses it) and sets MOTO_SERVER.
_moto_install() {
    local venv="$_moto_root/.venv"
    MOTO_SERVER="$venv/bin/moto_server"
    if [[ -x "$MOTO_SERVER" ]]; then
        if [[ -x "$venv/bin/python" && "$(_moto_installed_version "$venv/bin/python")" == "$MOTO_VERSION" ]] \
            || [[ -d "$venv/site" && "$(_moto_installed_version python3 "$venv/site")" == "$MOTO_VERSION" ]]; then
            return 0
        fi
    fi
    echo "moto.sh: installing moto[server]==$MOTO_VERSION into $venv (once)" >&2
    if [[ ! -x "$venv/bin/python" ]]; then
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >&2 || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
            rm -rf "$venv"
            _moto_install_target
            return $?
        fi
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2 \
        || { _moto_die "pip install 'moto[server]==$MOTO_VERSION' into $venv failed"; return 1; }
}

# Fallback when `python3 -m venv` is unusable (e.g. Debian without python3-venv):
# pip install --target .venv/site, plus a small moto_server wrapper in .venv/bin.
_moto_install_target() {
    local site="$_moto_root/.venv/site"
    echo "moto.sh: python3 -m venv is unusable; installing with pip --target $site" >&2
    python3 -m pip install --quiet --disable-pip-version-check --upgrade --target "$site" \
        "moto[server]==$MOTO_VERSION" >&2 \
        || { _moto_die "python3 -m pip install --target $site 'moto[server]==$MOTO_VERSION' failed"; return 1; }
    mkdir -p "$_moto_root/.venv/bin"
    cat >"$MOTO_SERVER" <<SH
#!/usr/bin/env bash
export PYTHONPATH="$site\${PYTHONPATH:+:\$PYTHONPATH}"
exec python3 -c 'import sys; from moto.server import main; sys.exit(main())' "\$@"
SH
    chmod +x "$MOTO_SERVER"
}

_moto_free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

_moto_ready() {
    python3 - "$1" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/moto-api/", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

moto_stop() {
    if [[ -n "${MOTO_PID:-}" ]]; then
        # `|| true`: under set -e, wait's 143 (killed by SIGTERM) would abort an EXIT trap early.
        kill "$MOTO_PID" 2>/dev/null || true
        wait "$MOTO_PID" 2>/dev/null || true
        MOTO_PID=""
    fi
    return 0
}

moto_start() {
    _moto_install || return 1
    mkdir -p "$_moto_root/target"
    local log="$_moto_root/target/moto.log" port deadline
    port="$(_moto_free_port)" || { _moto_die "could not pick a free port"; return 1; }
    "$MOTO_SERVER" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
    MOTO_PID=$!
    deadline=$((SECONDS + 30))
    until _moto_ready "$port"; do
        if ! kill -0 "$MOTO_PID" 2>/dev/null; then
            tail -n 30 "$log" >&2
            MOTO_PID=""
            _moto_die "moto_server exited during start-up (log: $log)"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$log" >&2
            moto_stop
            _moto_die "moto_server did not answer on 127.0.0.1:$port within 30 s (log: $log)"
            return 1
        fi
        sleep 0.2
    done
    export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
    export AWS_ACCESS_KEY_ID=testing
    export AWS_SECRET_ACCESS_KEY=testing
    export AWS_REGION=us-east-1
    export AWS_DEFAULT_REGION=us-east-1
    unset AWS_PROFILE AWS_SESSION_TOKEN
    echo "moto.sh: moto_server $MOTO_VERSION on $AWS_ENDPOINT_URL (pid $MOTO_PID, log $log)" >&2
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    # Executed: run in the foreground until interrupted.
    set -euo pipefail
    trap moto_stop EXIT
    trap 'exit 130' INT TERM
    moto_start
    echo "export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1"
    wait "$MOTO_PID"
else
    # Sourced: start moto and stop it when the sourcing shell exits.
    moto_start || return 1
    _moto_prev_exit_trap="$(trap -p EXIT | sed -E "s/^trap -- '(.*)' EXIT\$/\\1/")"
    # shellcheck disable=SC2064
    trap "moto_stop; ${_moto_prev_exit_trap:-:}" EXIT
    # Turn INT/TERM into a normal exit so the EXIT trap runs (bash skips it on a fatal signal),
    # unless the sourcing script already handles them.
    [[ -n "$(trap -p INT)" ]] || trap 'exit 130' INT
    [[ -n "$(trap -p TERM)" ]] || trap 'exit 143' TERM
fi
