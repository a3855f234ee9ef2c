{{/* Chart name, overridable. */}}
{{- define "flywheel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "flywheel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "flywheel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "flywheel.labels" -}}
helm.sh/chart: {{ include "flywheel.chart" . }}
{{ include "flywheel.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flywheel
{{- end }}

{{/* Labels that select the operator's pods (immutable in the Deployment: keep them small). */}}
{{- define "flywheel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flywheel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "flywheel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flywheel.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "flywheel.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "flywheel.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (default .Chart.AppVersion .Values.trainerImage.tag) }}
{{- end }}

{{/* The restricted Pod Security Standard, for the operator and the test pod. */}}
{{- define "flywheel.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsUser }}
fsGroup: {{ .Values.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "flywheel.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Operator config file (OperatorConfig in operator/flywheel_operator/config.py). The
per-attempt NetworkPolicy admits this release's operator pods to the progress port. */}}
{{- define "flywheel.operatorConfig" -}}
{{- $config := deepCopy .Values.config }}
{{- $netpol := $config.networkPolicy | default dict }}
{{- if and (ne $netpol.enabled false) (not $netpol.operatorPeers) }}
{{- $operator := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" (include "flywheel.selectorLabels" . | fromYaml)) }}
{{- $_ := set $netpol "operatorPeers" (list $operator) }}
{{- $_ := set $config "networkPolicy" $netpol }}
{{- end }}
defaultImage: {{ include "flywheel.trainerImage" . | quote }}
{{ toYaml $config }}
{{- if .Values.kueue.enabled }}
kueue:
  {{- toYaml .Values.kueue | nindent 2 }}
{{- end }}
{{- end }}

{{/* Fail early on combinations the schema cannot express. */}}
{{- define "flywheel.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.peering.enabled) }}
{{- fail "replicas > 1 needs peering.enabled=true: standalone operators would double-process runs" }}
{{- end }}
{{- if not (hasKey .Values.config.pools .Values.config.defaultPool) }}
{{- if not (has .Values.config.defaultPool (list "h200" "cpu" "local")) }}
{{- fail (printf "config.defaultPool %q is not in config.pools (nor a built-in preset)" .Values.config.defaultPool) }}
{{- end }}
{{- end }}
{{- if not (hasKey .Values.config.pools .Values.config.preflightPool) }}
{{- if not (has .Values.config.preflightPool (list "h200" "cpu" "local")) }}
{{- fail (printf "config.preflightPool %q is not in config.pools (nor a built-in preset)" .Values.config.preflightPool) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The operator's built-in pool presets (config.PRESETS; tests/helm/test_admission.py keeps
them equal): what the admission policy knows of pools the values do not replace. */}}
{{- define "flywheel.presetPools" -}}
h200:
  nodeSelector: {flywheel.dev/pool: h200}
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  gpusPerNode: 8
cpu:
  nodeSelector: {flywheel.dev/pool: cpu}
local:
  nodeSelector: {flywheel.dev/executor: local}
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  gpusPerNode: 2
{{- end }}

{{/* Every pool the operator knows (presets replaced by name by config.pools), as JSON:
{"selectors": {pool: nodeSelector}, "gpus": {pool: gpusPerNode}, "fences": [taint keys only
pools may tolerate: nvidia.com/gpu and every key a pool tolerates]}. */}}
{{- define "flywheel.poolTable" -}}
{{- $pools := deepCopy (.Values.config.pools | default dict) }}
{{- range $name, $pool := include "flywheel.presetPools" . | fromYaml }}
{{- if not (hasKey $pools $name) }}{{ $_ := set $pools $name $pool }}{{ end }}
{{- end }}
{{- $selectors := dict }}{{ $gpus := dict }}{{ $fences := list "nvidia.com/gpu" }}
{{- range $name, $pool := $pools }}
{{- $_ := set $selectors $name ($pool.nodeSelector | default dict) }}
{{- $_ := set $gpus $name (int ($pool.gpusPerNode | default 0)) }}
{{- range $pool.tolerations | default list }}
{{- if .key }}{{ $fences = append $fences .key }}{{ end }}
{{- end }}
{{- end }}
{{- dict "selectors" $selectors "gpus" $gpus "fences" ($fences | uniq | sortAlpha) | toJson }}
{{- end }}
