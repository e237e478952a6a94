#!/bin/bash
# Slurm job of pod default/init-and-two (uid 5f0c8a9e-1d2b-4c3d-8e4f-123456789abc), rendered by hpk.
# What it writes into the pod folder, and when: the job script contract in docs/kubelet.md.

pod_dir=/home/alice/.hpk/pods/default/init-and-two
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
    for name in first second writer reader; do
        mark_killed "$name" "$at"
    done
    [[ -z $running ]] || kill -TERM $running 2>/dev/null
    wait
}
trap 'trap "" TERM INT; stop; exit 143' TERM
trap 'trap "" TERM INT; stop; exit 130' INT
trap stop EXIT

cd -- "$pod_dir" || exit 125
mkdir -p -- "$containers" volumes/work || exit 125

# Apptainer's options for this user on this node: --no-privs as root, --unsquash without FUSE.
options=$("$python" -I -m hpk.apptainer) || exit 125
read -r -a run_options <<<"$options"

# Init containers, one after another: the first that fails ends the job with its code.

# first: docker.io/library/busybox:latest
"$python" -I -m kubelet_py.launch --image /home/alice/.hpk/images/docker.io/library/busybox/latest.sif "$containers"/first -- \
    "$apptainer" --quiet exec "${run_options[@]}" --cleanenv --no-eval --pid --pwd / \
    --bind /home/alice/.hpk/pods/default/init-and-two/volumes/work:/work \
    /home/alice/.hpk/images/docker.io/library/busybox/latest.sif sh -c 'echo first > /work/order' &
wait "$!" || exit "$?"

# second: docker.io/library/busybox:latest
"$python" -I -m kubelet_py.launch --image /home/alice/.hpk/images/docker.io/library/busybox/latest.sif "$containers"/second -- \
    "$apptainer" --quiet exec "${run_options[@]}" --cleanenv --no-eval --pid --pwd / \
    --bind /home/alice/.hpk/pods/default/init-and-two/volumes/work:/work \
    /home/alice/.hpk/images/docker.io/library/busybox/latest.sif sh -c 'echo second >> /work/order' &
wait "$!" || exit "$?"

# Containers, side by side. The job's code is the first non-zero one, in the pod's order.
main_pids=()

# writer: docker.io/library/busybox:latest
"$python" -I -m kubelet_py.launch --image /home/alice/.hpk/images/docker.io/library/busybox/latest.sif "$containers"/writer -- \
    "$apptainer" --quiet exec "${run_options[@]}" --cleanenv --no-eval --pid --pwd / \
    --bind /home/alice/.hpk/pods/default/init-and-two/volumes/work:/work \
    /home/alice/.hpk/images/docker.io/library/busybox/latest.sif sh -c 'cat /work/order; echo ready > /work/ready' &
main_pids+=("$!")

# reader: docker.io/library/busybox:latest
"$python" -I -m kubelet_py.launch --image /home/alice/.hpk/images/docker.io/library/busybox/latest.sif "$containers"/reader -- \
    "$apptainer" --quiet exec "${run_options[@]}" --cleanenv --no-eval --pid --pwd / \
    --bind /home/alice/.hpk/pods/default/init-and-two/volumes/work:/work:ro \
    /home/alice/.hpk/images/docker.io/library/busybox/latest.sif sh -c 'while [ ! -e /work/ready ]; do sleep 0.1; done' &
main_pids+=("$!")

code=0
for pid in "${main_pids[@]}"; do
    wait "$pid"
    status=$?
    ((code != 0)) || code=$status
done
exit "$code"
