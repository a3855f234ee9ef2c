{{- /*
Least privilege: exactly the verbs the operator uses (operator/flywheel_operator/kube.py and
handlers.py, plus what kopf itself needs). No Secrets at all: runs reference the Comet API key
by secretKeyRef, which the kubelet resolves, never the operator.
*/}}
{{- define "flywheel.namespacedRules" -}}
# The Flywheel API: watched (kopf indexes and event handlers); the operator writes only the
# status subresource (never spec, labels or finalizers: GitOps sees no drift). Schedules
# create and delete runs; registration creates ModelVersions (and a Model when missing).
- apiGroups: ["flywheel.dev"]
  resources: ["finetuneruns"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["flywheel.dev"]
  resources: ["finetuneschedules"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["flywheel.dev"]
  resources: ["modelversions"]
  verbs: ["get", "list", "watch", "create"]
- apiGroups: ["flywheel.dev"]
  resources: ["models"]
  verbs: ["get", "list", "watch", "create"]
- apiGroups: ["flywheel.dev"]
  resources: ["finetuneruns/status", "finetuneschedules/status", "models/status"]
  verbs: ["patch"]
# One Indexed Job per attempt (and the preflight Job); patched only to (un)suspend. Children
# are the run's by owner uid: an existing one is read before it is taken as the run's or
# deleted (a namesake's is never adopted nor deleted).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
# Per attempt of more than one node: the headless rendezvous Service (a deterministic name;
# read only to check the owner of one that exists already). The trainer's config travels in
# its Job's pod template: no ConfigMap.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "delete"]
# Per namespace, the fence that admits only the operator to trainer pods; per attempt of more
# than one node, the NetworkPolicy that admits its pods to each other.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch", "delete"]
# Pods are read only: phases, exit codes and rank 0's termination message (the summary).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Events on runs (kopf posts core/v1 Events; events.k8s.io for newer clients).
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Serving targets: the promoted alias's URI goes into the named Deployment's container.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "patch"]
# ... or into the named KServe InferenceService (spec.predictor.model.storageUri).
- apiGroups: ["serving.kserve.io"]
  resources: ["inferenceservices"]
  verbs: ["get", "patch"]
{{- if .Values.kueue.enabled }}
# Kueue: a run's Workload tells whether it is queued, admitted (and with which flavor) or
# evicted; `spec.suspend` of a queued run deactivates its Workload (spec.active).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["localqueues"]
  verbs: ["get", "list", "watch"]
# The visibility API: a pending run's position in its LocalQueue.
- apiGroups: ["visibility.kueue.x-k8s.io"]
  resources: ["localqueues/pendingworkloads"]
  verbs: ["get"]
{{- end }}
{{- end }}
{{- define "flywheel.peeringRule" -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ . | quote }}]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
