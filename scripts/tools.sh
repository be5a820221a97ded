#!/usr/bin/env bash
# Deployment tooling for CI and local checks: the AWS SAM CLI, cfn-lint and cargo-lambda (with
# zig), pinned, installed once into .venv/tools — a virtualenv of its own inside the repository's
# gitignored .venv, so that the SAM CLI's dependency pins (boto3, botocore, click…) never change
# the packages moto runs with in .venv itself.
#
# Source it (`. scripts/tools.sh`): afterwards `sam`, `cfn-lint` and `cargo-lambda` are on PATH.
# Like scripts/moto.sh it falls back to `pip install --target` plus small wrappers when
# `python3 -m venv` is unusable (Debian without python3-venv).

SAM_CLI_VERSION="1.170.0"
CFN_LINT_VERSION="1.58.0"
CARGO_LAMBDA_VERSION="1.9.2"

_tools_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_tools_venv="$_tools_root/.venv/tools"
_tools_pins=("aws-sam-cli==$SAM_CLI_VERSION" "cfn-lint==$CFN_LINT_VERSION" "cargo-lambda==$CARGO_LAMBDA_VERSION")

_tools_die() {
    echo "tools.sh: $*" >&2
    return 1 2>/dev/null || exit 1
}

# Prints "ok" when every pinned version is installed for interpreter $1 (PYTHONPATH $2).
_tools_current() {
    PYTHONPATH="${2:-}" "$1" - "$SAM_CLI_VERSION" "$CFN_LINT_VERSION" "$CARGO_LAMBDA_VERSION" <<'PY' 2>/dev/null || true
import sys, importlib.metadata as m
want = dict(zip(["aws-sam-cli", "cfn-lint", "cargo-lambda"], sys.argv[1:]))
print("ok" if all(m.version(k) == v for k, v in want.items()) else "stale")
PY
}

# A wrapper in $2/bin running console script $1 from the --target site $3.
_tools_wrapper() {
    cat >"$2/bin/$1" <<SH
#!/usr/bin/env bash
export PYTHONPATH="$3\${PYTHONPATH:+:\$PYTHONPATH}"
exec python3 -c 'import sys
from importlib.metadata import entry_points
ep = next(e for e in entry_points(group="console_scripts") if e.name == "$1")
sys.argv[0] = "$1"
sys.exit(ep.load()())' "\$@"
SH
    chmod +x "$2/bin/$1"
}

_tools_install() {
    if [[ -x "$_tools_venv/bin/python" && "$(_tools_current "$_tools_venv/bin/python")" == ok ]]; then
        export PATH="$_tools_venv/bin:$PATH"
        return 0
    fi
    if [[ -d "$_tools_venv/site" && "$(_tools_current python3 "$_tools_venv/site")" == ok ]]; then
        # cargo-lambda finds zig through `python3 -m ziglang`.
        export PYTHONPATH="$_tools_venv/site${PYTHONPATH:+:$PYTHONPATH}"
        export PATH="$_tools_venv/bin:$PATH"
        return 0
    fi
    echo "tools.sh: installing ${_tools_pins[*]} into $_tools_venv (once)" >&2
    if [[ ! -x "$_tools_venv/bin/python" ]]; then
        rm -rf "$_tools_venv"
        mkdir -p "$_tools_root/.venv"
        if ! python3 -m venv "$_tools_venv" >&2 || ! "$_tools_venv/bin/python" -m pip --version >/dev/null 2>&1; then
            rm -rf "$_tools_venv"
            echo "tools.sh: python3 -m venv is unusable; installing with pip --target" >&2
            mkdir -p "$_tools_venv/bin"
            python3 -m pip install --quiet --disable-pip-version-check --upgrade \
                --target "$_tools_venv/site" "${_tools_pins[@]}" >&2 \
                || { _tools_die "pip install --target $_tools_venv/site ${_tools_pins[*]} failed"; return 1; }
            for script in sam cfn-lint; do
                _tools_wrapper "$script" "$_tools_venv" "$_tools_venv/site"
            done
            # cargo-lambda's wheel ships a native executable, not a console script.
            ln -sf "$_tools_venv/site/bin/cargo-lambda" "$_tools_venv/bin/cargo-lambda"
            # cargo-lambda finds zig through `python3 -m ziglang`.
            export PYTHONPATH="$_tools_venv/site${PYTHONPATH:+:$PYTHONPATH}"
            export PATH="$_tools_venv/bin:$PATH"
            return 0
        fi
    fi
    "$_tools_venv/bin/python" -m pip install --quiet --disable-pip-version-check "${_tools_pins[@]}" >&2 \
        || { _tools_die "pip install ${_tools_pins[*]} into $_tools_venv failed"; return 1; }
    export PATH="$_tools_venv/bin:$PATH"
}

_tools_install || return 1 2>/dev/null || exit 1
# The SAM CLI would otherwise try to send telemetry.
export SAM_CLI_TELEMETRY=0
