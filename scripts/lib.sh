# shellcheck shell=bash
# Shared by scripts/test and scripts/run (sourced, not run): root via sudo, apt installs,
# and the project's virtualenv at .venv with the project installed in it (editable).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Run a command as root: directly when we are root, else through sudo.
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "root is needed to run '$*': run as root or install sudo"
    fi
}

# apt-get install Debian packages (apt-get update first, once per run).
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "no apt-get here: install $* by hand"
    if [[ -z ${_PGMUX_APT_UPDATED:-} ]]; then
        log "apt-get update"
        as_root apt-get update -q >&2
        _PGMUX_APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2
}

_python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

# Print the first Python >= 3.11 among $PYTHON, python3, python3.13, python3.12, python3.11.
find_python() {
    local candidate
    if ! command -v python3 >/dev/null 2>&1 && [[ -z ${PYTHON:-} ]]; then
        apt_install python3 python3-venv
    fi
    for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 && _python_ok "$candidate"; then
            command -v "$candidate"
            return
        fi
    done
    die "pgmux needs Python >= 3.11, but python3 is $(python3 -V 2>&1 || echo missing);" \
        "install a newer one and/or point PYTHON at it (PYTHON=/path/to/python3.11 $0)"
}

# Create .venv if it is missing (or broken, or made with a Python older than 3.11).
ensure_venv() {
    if [[ -x $VENV/bin/python ]] && _python_ok "$VENV/bin/python"; then
        return
    fi
    if [[ -e $VENV ]]; then
        log "removing $VENV: it is broken or its Python is older than 3.11"
        rm -rf "$VENV"
    fi
    local python
    python="$(find_python)"
    log "creating $VENV with $python ($("$python" -V 2>&1))"
    if ! "$python" -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        log "'$python -m venv' failed: installing python3-venv"
        apt_install python3-venv
        "$python" -m venv "$VENV" || die "could not create $VENV with $python"
    fi
}

# For the optional C stream scanner (setup.py): a C compiler and Python's headers,
# installed with apt-get when missing and possible. Without them pgmux builds anyway and
# scans in Python.
ensure_c_build_tools() {
    local wanted=()
    command -v cc >/dev/null 2>&1 || wanted+=(gcc libc6-dev)
    if ! "$VENV/bin/python" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        wanted+=("python3-dev")  # Debian's own python3 keeps its headers there
    fi
    ((${#wanted[@]})) || return 0
    if command -v apt-get >/dev/null 2>&1 && { [[ $EUID -eq 0 ]] || command -v sudo >/dev/null 2>&1; }; then
        apt_install "${wanted[@]}" || log "could not install ${wanted[*]}: pgmux will scan in Python"
    else
        log "no ${wanted[*]}: pgmux will build without its C scanner and scan in Python"
    fi
}

# pip install -e SPEC into .venv, skipped when already done for this pyproject.toml,
# setup.py and C scanner (PGMUX_REINSTALL=1 forces it).
pip_install_project() {
    local spec=$1 stamp want
    stamp="$VENV/.pgmux-installed${spec//[^A-Za-z0-9]/_}"
    # setup.py and the C scanner too: an edited _scan.c must be rebuilt, never left stale.
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/proxy/protocol/_scan.c" |
        sha256sum | cut -d' ' -f1) $spec"
    if [[ ${PGMUX_REINSTALL:-} != 1 && -f $stamp && "$(<"$stamp")" == "$want" ]]; then
        return
    fi
    ensure_c_build_tools
    log "pip install -e '$spec'"
    (cd "$ROOT" && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec")
    printf '%s\n' "$want" >"$stamp"
}
