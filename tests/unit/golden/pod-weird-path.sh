#!/bin/bash
# Slurm job of pod default/echo (uid 5f0c8a9e-1d2b-4c3d-8e4f-123456789abc), rendered by hpk.
# What it writes into the pod folder, and when: the job script contract in docs/kubelet.md.

pod_dir='/var/tmp/it'"'"'s a "pod"; folder/default/weird'
apptainer=/opt/hpk/tools/apptainer-1.4.3/bin/apptainer
python=/home/alice/hpk/.venv/bin/python
containers="$pod_dir/containers"

now() { date -u +%Y-%m-%dT%H:%M:%S.%NZ; }

# A container that started and has no exit marker when the job is stopped is marked killed
# (137). If its launcher outlives Slurm's KILL, it replaces the mark with the real code;
# ln never replaces a marker the launcher wrote first.
mark_killed() {
    local marker="$containers/$1/exit"
    [[ -e $containers/$1/started && ! -e $marker ]] || return 0
    printf '137 %s\n' "$2" >"$marker.trap" && ln -- "$marker.trap" "$marker" 2>/dev/null
    rm -f -- "$marker.trap"
}

# Mark the containers, pass TERM to their launchers, and wait for them.
stopped=0
stop() {
    ((stopped)) && return 0
    stopped=1
    local running at name
    running=$(jobs -pr)
    at=$(now)
    for name in main; do
        mark_killed "$name" "$at"
    done
    [[ -z $running ]] || kill -TERM $running 2>/dev/null
    wait
}
# Node-local folders of this job (each container's /tmp and /var/tmp, memory emptyDirs),
# removed when it ends.
scratch_dirs=()
cleanup() {
    rm -rf -- "${scratch_dirs[@]}"
}
trap 'trap "" TERM INT; stop; exit 143' TERM
trap 'trap "" TERM INT; stop; exit 130' INT
trap 'stop; cleanup' EXIT

cd -- "$pod_dir" || exit 125
mkdir -p -- "$containers" || exit 125

# Apptainer's options for this user on this node: --no-privs as root, --unsquash without FUSE,
# and the node's /etc/hosts (not on the pod network) and /etc/localtime, read-only.
options=$("$python" -I -m hpk.apptainer pod) || exit 125
read -r -a run_options <<<"$options"

# Each container's private /tmp and /var/tmp (Apptainer's --workdir) on the node's own disk,
# in a folder mktemp makes for this job: 0700 and the job user's, never one planted by
# another user. A container's folder keeps its files across its restarts.
scratch=$(mktemp -d -p "${TMPDIR:-/tmp}" "hpk-job-${SLURM_JOB_ID:-$$}.XXXXXX" 2>/dev/null ||
    mktemp -d -p /tmp "hpk-job-${SLURM_JOB_ID:-$$}.XXXXXX") || exit 125
scratch_dirs+=("$scratch")

# Without FUSE, Apptainer unpacks each container's image with unsquashfs, whose queues
# default to 256 MB each, in the job's memory: three containers starting at once took more
# than a 256 MB job has. Apptainer finds unsquashfs on PATH, so it finds one with 16 MB
# queues first (as fast for images of this size; the folder's name is no container's). It is
# a wrapper as Apptainer's unprivileged install writes them: with _WRAPPER_EXEC_CMD set,
# Apptainer learns the real program and its libraries through it.
if [[ " ${run_options[*]} " == *" --unsquash "* ]] && unsquashfs=$(command -v unsquashfs); then
    mkdir -m 0700 "$scratch/.unsquashfs" &&
        printf '#!/bin/bash\nif [[ -n ${_WRAPPER_EXEC_CMD:-} ]]; then exec $_WRAPPER_EXEC_CMD %q "$@"; fi\nexec %q -da 16 -fr 16 "$@"\n' \
            "$unsquashfs" "$unsquashfs" >"$scratch/.unsquashfs/unsquashfs" &&
        chmod 0700 "$scratch/.unsquashfs/unsquashfs" || exit 125
    PATH=$scratch/.unsquashfs:$PATH
fi

# A container's scratch folders (its launcher makes its folder in the pod's, with the
# termination handshake's files, when it starts it: a container that never starts has none).
prepare() {
    mkdir -p -- "$scratch/$1/tmp" "$scratch/$1/var_tmp" &&
        chmod 1777 -- "$scratch/$1/tmp" "$scratch/$1/var_tmp"
}
prepare main || exit 125

# Containers, side by side. The job's code is the first non-zero one, in the pod's order.
main_pids=()

# main: docker.io/library/busybox:latest
"$python" -I -m kubelet_py.job.launch --image /home/alice/.hpk/images/docker.io/library/busybox/latest.sif --attach --termination /dev/termination-log "$containers"/main -- \
    "$apptainer" --quiet exec "${run_options[@]}" --cleanenv --no-eval --contain --no-mount bind-paths,hostfs,cwd --writable-tmpfs --no-home --home /:/ --pid --pwd / \
    --workdir "$scratch"/main \
    --bind "$containers"/main/handshake:/.hpk-ready \
    --bind "$containers"/main/handshake.sh:/.singularity.d/env/00-hpk-ready.sh:ro \
    /home/alice/.hpk/images/docker.io/library/busybox/latest.sif echo hello &
main_pids+=("$!")

code=0
for pid in "${main_pids[@]}"; do
    wait "$pid"
    status=$?
    ((code != 0)) || code=$status
done
exit "$code"
