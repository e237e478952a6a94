"""The kubelet's threads: the pod controller and the binder with their work queue, the node
heartbeat, the bulk Slurm watcher, tokens, image pulls, the storage provisioner, Events, the
marker watch and the log server. Each talks to the outside through the adapters."""
