#!/usr/bin/env bash
# Runs the split job on the current kubectl context: the shard Indexed Job, then — only when
# every index completed — the merge. Kubernetes has no job dependencies, so this waits.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kubectl apply -f "$here/pvc.yaml"
kubectl apply -f "$here/shards.yaml"
kubectl wait --for=condition=complete job/awq-shards --timeout=48h
kubectl apply -f "$here/merge.yaml"
kubectl wait --for=condition=complete job/awq-merge --timeout=6h
kubectl logs job/awq-merge | tail -n 3
