{{/* vim: set filetype=mustache: */}}

{{/* Chart name, truncated to the 63 characters DNS names allow. */}}
{{- define "tagway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. If the release name already contains the chart name it is not repeated.
*/}}
{{- define "tagway.fullname" -}}
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

{{- define "tagway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels (app.kubernetes.io/*). */}}
{{- define "tagway.labels" -}}
helm.sh/chart: {{ include "tagway.chart" . }}
{{ include "tagway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tagway
{{- end }}

{{/* Selector labels: stable across upgrades, never add anything that changes. */}}
{{- define "tagway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tagway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "tagway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tagway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the Secret the pods read their env from: the user's existingSecret or the chart's own. */}}
{{- define "tagway.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- include "tagway.fullname" . }}
{{- end }}
{{- end }}

{{- define "tagway.configMapName" -}}
{{- printf "%s-config" (include "tagway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tagway.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The rendered tagway.yaml (one definition, used by the ConfigMap and by the checksum annotation). */}}
{{- define "tagway.configYaml" -}}
{{- toYaml .Values.config }}
{{- end }}

{{/*
Render-time checks. Called from the workload template so that a bad combination fails `helm install` with a
clear message instead of a pod that never starts.
*/}}
{{- define "tagway.validate" -}}
{{- if not (has .Values.kind (list "Deployment" "StatefulSet")) }}
{{- fail (printf "kind must be Deployment or StatefulSet, got %q" .Values.kind) }}
{{- end }}
{{- if and .Values.spool.persistence.enabled (ne .Values.kind "StatefulSet") }}
{{- fail "spool.persistence.enabled needs kind: StatefulSet (a Deployment cannot give each pod its own PVC; a shared volume would let two pods re-send the same spool files)" }}
{{- end }}
{{- $storage := (.Values.config | default dict).storage | default dict }}
{{- if and $storage.dsn (hasPrefix "chdb" (toString $storage.dsn)) }}
{{- fail "config.storage.dsn is an embedded chDB DSN: chDB is single-process and cannot be shared by pods; point the chart at a ClickHouse server (http(s)://user:pass@host:8123/db)" }}
{{- end }}
{{- if and (not .Values.secrets.existingSecret) (hasPrefix "chdb" (toString .Values.secrets.clickhouseDsn)) }}
{{- fail "secrets.clickhouseDsn is an embedded chDB DSN: chDB is single-process and cannot be shared by pods; point the chart at a ClickHouse server (http(s)://user:pass@host:8123/db)" }}
{{- end }}
{{- if not $storage.spool_dir }}
{{- fail (printf "config.storage.spool_dir is not set: set it to spool.mountPath (%s), the only writable place for the spool (the root filesystem is read-only)" .Values.spool.mountPath) }}
{{- end }}
{{- if ne (toString $storage.spool_dir) .Values.spool.mountPath }}
{{- fail (printf "config.storage.spool_dir (%s) must equal spool.mountPath (%s): the spool must live on the writable spool volume" $storage.spool_dir .Values.spool.mountPath) }}
{{- end }}
{{- $metrics := (.Values.config | default dict).metrics | default dict }}
{{- if and .Values.serviceMonitor.enabled $metrics.auth (not .Values.serviceMonitor.authorization) }}
{{- fail "serviceMonitor.enabled with config.metrics.auth: /metrics needs the admin key, so Prometheus would get 401 on every scrape; set serviceMonitor.authorization (e.g. {type: Bearer, credentials: {name: <secret>, key: TAGWAY_ADMIN_KEY}})" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) }}
{{- fail "podDisruptionBudget: set only one of maxUnavailable and minAvailable (set the other to null)" }}
{{- end }}
{{- end }}
