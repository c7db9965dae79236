#!/bin/sh
# Entry point of the Avatar Forcing image (runs under tini as PID 1).
#
#   serve [FLAGS]      make sure the weights are there (WEIGHTS_ON_START), then exec `avatar-forcing serve`
#   prepare-weights    only the weights step, then exit (Kubernetes Job / initContainer)
#   COMMAND ...        anything else: run it (a program on PATH, or an `avatar-forcing` subcommand,
#                      e.g. `weights list`)
#
# WEIGHTS_ON_START (weights of AVATAR_FORCING_WEIGHTS, default /weights, checked against
# AVATAR_FORCING_CONFIG):
#   download (default)  verify; if that fails, download what is missing from the Hugging Face hub (needs
#                       network; HF_TOKEN / HF_ENDPOINT are honoured; progress goes to the log) and
#                       verify again
#   verify              verify only; fail if the weights are missing or broken (read-only volumes)
#   skip                trust the volume (someone else verified it, e.g. an initContainer)
set -eu

log() {
    printf '%s entrypoint: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

verify() {
    avatar-forcing weights verify --weights "$1" --config "${AVATAR_FORCING_CONFIG:-official}"
}

prepare_weights() {
    weights="${AVATAR_FORCING_WEIGHTS:-/weights}"
    policy="${WEIGHTS_ON_START:-download}"
    case "$policy" in
        skip)
            log "WEIGHTS_ON_START=skip: not checking $weights"
            return 0 ;;
        verify | download) ;;
        *)
            log "WEIGHTS_ON_START=$policy: expected download, verify or skip"
            return 2 ;;
    esac

    log "checking the weights in $weights"
    if verify "$weights"; then
        log "weights ok"
        return 0
    fi
    if [ "$policy" = verify ]; then
        log "the weights in $weights are missing or broken (WEIGHTS_ON_START=verify: not downloading)"
        return 1
    fi
    if [ -f "$weights" ]; then
        log "$weights is a single checkpoint file: nothing can be downloaded into it; replace the file"
        return 1
    fi
    if [ "$weights" = hub ]; then
        log "downloading the official weights into the Hugging Face cache"
        avatar-forcing weights download
    else
        if ! mkdir -p "$weights" 2>/dev/null || [ ! -w "$weights" ]; then
            log "$weights is not writable by uid $(id -u): mount a writable volume there, or fill it beforehand"
            return 1
        fi
        log "downloading the official weights (~1.2 GB) into $weights; files already there are kept"
        avatar-forcing weights download --dir "$weights"
    fi
    log "download finished; checking again"
    if ! verify "$weights"; then
        log "the weights in $weights are still not usable: delete the files reported above and restart" \
            "(files already there are never downloaded again)"
        return 1
    fi
    log "weights ok"
}

command="${1:-serve}"
if [ $# -gt 0 ]; then shift; fi
case "$command" in
    serve)
        prepare_weights
        log "starting the server"
        exec avatar-forcing serve "$@" ;;
    prepare-weights)
        prepare_weights ;;
    *)
        if command -v "$command" >/dev/null 2>&1; then
            exec "$command" "$@"
        fi
        exec avatar-forcing "$command" "$@" ;;
esac
